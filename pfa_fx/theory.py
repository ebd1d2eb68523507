"""Random-matrix theory of PFA's feedback path (the paper's Proposition 3 and Figure 3).

In PFA the feedback weight of a layer is ``W_b = B·R`` with ``B`` (``n_out x n̄``) fixed
random, entries ``N(0, 1/n̄)``, ``n̄ = expansion·n_out``, and ``R`` plastic. With weight
decay, ``R -> B^T W`` and so ``W_b -> B B^T W = G W`` (docs/design.md, sections 'PFA' and 'Compact PFA'). How well the
feedback path aligns with ``W`` is therefore a property of the spectrum of
``G = B B^T``, which is a Wishart matrix ``(1/n̄)·X X^T`` (``X`` an ``n_out x n̄`` standard
Gaussian matrix). As ``n_out, n̄ -> ∞`` with ``λ = n_out / n̄ = 1 / expansion`` fixed, its
eigenvalue distribution tends to Marchenko–Pastur (MP) with ratio ``λ`` and variance
parameter 1:

* mean eigenvalue 1, second moment ``1 + λ`` (so variance ``λ``, std ``1/sqrt(expansion)``);
* continuous part supported on ``[(1 - √λ)², (1 + √λ)²]``;
* for ``λ > 1`` (``expansion < 1``) an extra point mass ``1 - 1/λ`` at 0 (``G`` is singular).

``B^T B`` (``n̄ x n̄``) has the same non-zero eigenvalues plus ``n̄ - n_out`` zeros.

Path alignment. For a weight ``W`` (``n_out x n_in``) the angle between ``W`` and ``G W``
(Frobenius inner product) has

    cos θ = tr(Wᵀ G W) / (‖W‖ ‖G W‖).

*Assumption*: ``W`` is independent of ``B`` and generic with respect to it: its left
singular vectors are isotropic (Haar-distributed) — e.g. i.i.d. Gaussian entries, or
any ``W`` rotated at random on its output side — or, more loosely, its entries are
i.i.d. with mean 0 (then the two expectations below hold exactly as well). Writing
``W = U Σ Vᵀ`` and averaging over ``U`` gives exactly
``E_U tr(Wᵀ G W) = ‖W‖²·tr(G)/n_out`` and ``E_U ‖G W‖² = ‖W‖²·tr(G²)/n_out``; both
quadratic forms concentrate when ``n_out`` (and the rank of ``W``) are large, so

    cos θ -> m1 / sqrt(m2) = 1 / sqrt(1 + λ) = 1 / sqrt(1 + 1/expansion),
    i.e.  tan θ = sqrt(λ) = 1 / sqrt(expansion),

with ``m1, m2`` the first two spectral moments of ``G`` (the overall scale of ``B``
cancels). At expansion 1 that is 45°, at 10 it is 17.55°, at 100 it is 5.71°. The
singular values of ``W`` do not enter (only the spectral moments of ``G`` do).

Finite size. With ``n = n_out``, ``m = n̄ = round(expansion·n)`` (as the PFA rule draws
it) and ``g_k = tr(G^k)/n``, the exact Wishart moments are

    E g1 = 1,   E g2 = 1 + (n + 1)/m,
    Var g1 = 2/(n m),   Cov(g1, g2) = 4(n + m + 1)/(n m²),
    Var g2 = 4(2m² + 5nm + 2n² + 5n + 5m + 5)/(n m³)

(the first from ``E[(XXᵀ)_ii²] = m² + 2m`` and ``E[(XXᵀ)_ij²] = m`` for ``i ≠ j``; the
covariances checked by simulation). :func:`predicted_path_angle` with ``n_out`` given
expands ``θ = arccos(g1 / sqrt(g2))`` to second order around these means: the ``1/n``
term is ``λ -> λ_eff = (n + 1)/m``, the ``1/n²`` terms come from the fluctuations of
``tr G`` and ``tr G²`` (and from the curvature of ``arccos``); with ``n_in`` also
given it adds the fluctuations of a Gaussian ``W`` (terms of order ``1/(n·n_in)``,
using the MP moments ``g3 = 1 + 3λ + λ²``, ``g4 = 1 + 6λ + 6λ² + λ³``). Checked
against simulation (``tests/test_theory.py``; expansions 1–100): for ``n_out ≥ 16`` the
corrected value matches the simulated mean angle within the Monte-Carlo error
(≈ 0.03°), at ``n_out = 8`` to ≲ 0.2°, while the expansion breaks down at
``n_out = 4`` (errors up to 2.5°). At ``n_out = 256`` all corrections together are
below 0.06°.

Caveat: a *trained* ``W`` is not independent of ``B`` (under PFA the error that trains
``W`` has itself passed through ``G``), so this predicts the alignment of the
converged feedback path for a generic ``W`` (the setting of the paper's Proposition 3 /
Figure 3 as docs/design.md, section 'Path alignment', describes it), not an exact law for every trained network.

pfa-o draws ``B`` with orthonormal rows, so ``G = I`` exactly and θ = 0 at any
expansion ≥ 1.

Sparse feedback (``density = p < 1``). The rule keeps each entry of ``B`` with
probability ``p`` and rescales it: ``B = (M ⊙ X)/sqrt(p·m)``, ``M`` i.i.d. Bernoulli(p),
``X`` i.i.d. ``N(0, 1)``. Each entry then has ``E b² = 1/m`` (so ``E[B Bᵀ] = I`` and
``E g1 = 1`` still) but heavier tails: ``E b⁴ = 3/(p m²)``, ``E b⁶ = 15/(p² m³)``,
``E b⁸ = 105/(p³ m⁴)``. For i.i.d. symmetric entries with ``E b^{2k} = κ_{2k}/m^k``
(``κ4 = 3/p``, ``κ6 = 15/p²``, ``κ8 = 105/p³``; Gaussian: 3, 15, 105) the same counting
as above (``E[G_ii²] = m·E b⁴ + m(m - 1)/m²``, ``E[G_ik²] = 1/m``) gives exactly

    E g2 = 1 + (n + κ4 - 2)/m = 1 + (n + 3/p - 2)/m,
    Var g1 = (κ4 - 1)/(n m),
    Cov(g1, g2) = (2κ4(m + n) - 5κ4 + κ6 - 2(m + n) + 4)/(n m²),
    Var g2 = (2κ4²(m + n) - 5κ4² + 4κ4(m + n)² - 24κ4(m + n) + 32κ4
              + 4κ6(m + n) - 8κ6 + κ8 - 4(m² + mn + n²) + 14(m + n) - 16)/(n m³)

(derived by enumerating the index coincidences of ``tr G``, ``tr G²`` and their
products; at ``p = 1`` they are the Wishart values above). So the path cosine tends to
``1/sqrt(1 + λ_eff)`` with

    λ_eff = (n_out + 3/p - 2)/n̄ = (n_out + 1)/n̄ + 3(1/p - 1)/n̄,

i.e. sparsity costs as much alignment as ``3(1/p - 1)`` extra output units would. The
extra term is ``1/n̄`` against ``λ = n_out/n̄``: relative to λ it is ``≈ 3/(p·n_out)``,
three over the mean number of output units an error unit reaches. At fixed density the
``n_out -> ∞`` limit is the dense one (MP is universal); density matters when
``p·n_out`` is small (``n_out = 256``, ``p = 0.1``: λ grows by 11 %, at expansion 10 the
angle goes from 17.6° to 18.4°). With ``n_in`` given the ``1/(n·n_in)`` terms use the MP
moments at ``λ = (n + κ4 - 3)/m`` (an approximation of a term already of second order).
The rule connects an output unit whose mask row came out empty to one random error
unit; that happens with probability ``(1 - p)^m`` per unit and is ignored here. Checked
against simulation (``tests/test_theory.py``, ``examples/fig3_expansion.py``): for
``n_out ≥ 32`` and ``p ≥ 0.1``, and for ``n_out = 16`` with ``p ≥ 0.2``, the predicted mean
angle is within the Monte-Carlo error (≲ 0.15°; at ``n_out = 256``, expansions 1–100,
within 0.12° over 10 draws); it fails where each output unit has only a few connections
(``n_out = n̄ = 16``, ``p = 0.1``: 1.5° too high, with 18 % of the rows repaired).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "effective_ratio",
    "feedback_gram",
    "marchenko_pastur_moments",
    "marchenko_pastur_pdf",
    "marchenko_pastur_support",
    "nbar_for",
    "path_angle",
    "path_cosine_moments",
    "predicted_eigenvalue_std",
    "predicted_path_angle",
    "simulate_path_angle",
]


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not ratio > 0 or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a positive finite number, got {ratio}")
    return ratio


def _check_expansion(expansion: float) -> float:
    expansion = float(expansion)
    if not expansion > 0 or not math.isfinite(expansion):
        raise ValueError(f"expansion must be a positive finite number, got {expansion}")
    return expansion


def _check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def _gram_moments(n: int, m: int, density: float) -> tuple[float, float, float, float]:
    """Exact ``(E g2, Var g1, Cov(g1, g2), Var g2)`` of ``G = B Bᵀ`` (``B``: ``n x m``, as PFA draws it)."""
    if density == 1.0:  # Wishart, written as before so that density 1 gives the same numbers
        mu2 = 1.0 + (n + 1) / m
        var1 = 2.0 / (n * m)
        cov12 = 4.0 * (n + m + 1) / (n * m * m)
        var2 = 4.0 * (2 * m * m + 5 * n * m + 2 * n * n + 5 * n + 5 * m + 5) / (n * m**3)
        return mu2, var1, cov12, var2
    # Bernoulli(p)-Gaussian entries rescaled to E b² = 1/m: standardized moments 3/p, 15/p², 105/p³
    return _iid_gram_moments(n, m, 3.0 / density, 15.0 / density**2, 105.0 / density**3)


def _iid_gram_moments(n: int, m: int, k4: float, k6: float, k8: float) -> tuple[float, float, float, float]:
    """``_gram_moments`` for i.i.d. symmetric entries with ``E b^{2k} = κ_{2k}/m^k`` (module docstring)."""
    s = m + n
    mu2 = 1.0 + (n + k4 - 2) / m
    var1 = (k4 - 1) / (n * m)
    cov12 = (2 * k4 * s - 5 * k4 + k6 - 2 * s + 4) / (n * m * m)
    var2 = (
        2 * k4 * k4 * s
        - 5 * k4 * k4
        + 4 * k4 * s * s
        - 24 * k4 * s
        + 32 * k4
        + 4 * k6 * s
        - 8 * k6
        + k8
        - 4 * (m * m + m * n + n * n)
        + 14 * s
        - 16
    ) / (n * m**3)
    return mu2, var1, cov12, var2


def effective_ratio(expansion: float, n_out: int | None = None, density: float = 1.0) -> float:
    """``λ_eff = E tr(G²)/n_out - 1``, so that the path cosine tends to ``1/sqrt(1 + λ_eff)``.

    ``n_out=None``: the ``n_out -> ∞`` limit at fixed expansion and density, ``1/expansion``
    (density drops out). ``n_out`` given: exactly ``(n_out + 3/density - 2)/n̄``.
    """
    density = _check_density(density)
    if n_out is None:
        return 1.0 / _check_expansion(expansion)
    return (n_out + 3.0 / density - 2) / nbar_for(n_out, expansion)  # E g2 - 1, κ4 = 3/density


def nbar_for(n_out: int, expansion: float) -> int:
    """Size ``n̄`` of the error population, rounded as the PFA rule does: ``max(1, round(expansion·n_out))``."""
    return max(1, round(_check_expansion(expansion) * n_out))


def marchenko_pastur_support(ratio: float) -> tuple[float, float]:
    """Edges ``((1 - √λ)², (1 + √λ)²)`` of the continuous part of MP with ratio ``λ = ratio``.

    Args:
        ratio: ``λ = n_out / n̄ = 1 / expansion`` (> 0).

    Returns:
        ``(low, high)``. For ``λ > 1`` there is in addition a point mass at 0.
    """
    s = math.sqrt(_check_ratio(ratio))
    return (1.0 - s) ** 2, (1.0 + s) ** 2


def marchenko_pastur_pdf(x: np.ndarray | float, ratio: float) -> np.ndarray:
    """Density of the continuous part of MP (variance parameter 1) at ``x``.

    ``p(x) = sqrt((b - x)(x - a)) / (2π λ x)`` on ``[a, b]`` (see
    :func:`marchenko_pastur_support`), 0 outside. It integrates to 1 for ``λ ≤ 1`` and to
    ``1/λ`` for ``λ > 1`` (the remaining ``1 - 1/λ`` is the atom at 0, not included).
    At ``λ = 1`` it diverges like ``x^{-1/2}`` at 0 (integrable); ``x = 0`` returns ``inf``.

    Args:
        x: points (array-like).
        ratio: ``λ = n_out / n̄ = 1 / expansion`` (> 0).

    Returns:
        ``np.ndarray`` (float64) of the same shape as ``x``.
    """
    lam = _check_ratio(ratio)
    a, b = marchenko_pastur_support(lam)
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    inside = (x >= a) & (x <= b)
    xi = x[inside]
    with np.errstate(divide="ignore", invalid="ignore"):
        val = np.sqrt(np.clip((b - xi) * (xi - a), 0.0, None)) / (2.0 * math.pi * lam * xi)
    out[inside] = np.where(xi == 0.0, np.inf, val)
    return out


def marchenko_pastur_moments(ratio: float) -> tuple[float, float]:
    """First two moments of MP with ratio ``λ`` (atom at 0 included when ``λ > 1``).

    Returns:
        ``(mean, second_moment) = (1, 1 + λ)``; the eigenvalue variance is ``λ``.
    """
    lam = _check_ratio(ratio)
    return 1.0, 1.0 + lam


def predicted_eigenvalue_std(expansion: float, n_out: int | None = None, density: float = 1.0) -> float:
    """Predicted standard deviation of the eigenvalues of ``G = B B^T``.

    Asymptotically ``sqrt(λ) = 1/sqrt(expansion)`` (at any fixed density). With ``n_out``
    given, returns the square root of the exact expected within-matrix eigenvalue variance
    ``E[tr G²/n - (tr G/n)²]``: ``(n+1)/n̄ - 2/(n·n̄)`` for the Wishart ``G`` (``n = n_out``),
    ``(n + κ4 - 2)/n̄ - (κ4 - 1)/(n·n̄)`` with ``κ4 = 3/density`` for sparse ``B``.
    """
    density = _check_density(density)
    if n_out is None:
        return 1.0 / math.sqrt(_check_expansion(expansion))
    nbar = nbar_for(n_out, expansion)
    if density == 1.0:
        return math.sqrt((n_out + 1) / nbar - 2.0 / (n_out * nbar))
    mu2, var1, _, _ = _gram_moments(n_out, nbar, density)
    return math.sqrt(mu2 - 1.0 - var1)


def path_cosine_moments(
    expansion: float, n_out: int, n_in: int | None = None, density: float = 1.0
) -> tuple[float, float]:
    """Mean and variance of ``cos θ(W, G W)`` to second order in ``1/n_out`` (and ``1/(n_out·n_in)``).

    Delta-method expansion of ``cos θ = a / sqrt(b·c)``, ``a = tr(WᵀGW)``, ``b = ‖W‖²``,
    ``c = ‖GW‖²``, around the exact moments of ``G`` listed in the module docstring
    (Wishart, or sparse ``B`` for ``density < 1``), for ``W`` with i.i.d. ``N(0, 1)``
    entries. ``n_in=None`` means ``n_in -> ∞`` (no fluctuations from ``W``).
    """
    if n_out < 1:
        raise ValueError(f"n_out must be >= 1, got {n_out}")
    density = _check_density(density)
    n, m = n_out, nbar_for(n_out, expansion)
    mu2, var1, cov12, var2 = _gram_moments(n, m, density)  # mu2 = E tr(G²)/n, exact
    # f(g1, g2) = g1 / sqrt(g2): f_1 = mu2^-1/2, f_2 = -mu2^-3/2 / 2, f_11 = 0,
    # f_12 = -mu2^-3/2 / 2, f_22 = 3 mu2^-5/2 / 4 (at g1 = 1)
    mean = mu2**-0.5 - 0.5 * mu2**-1.5 * cov12 + 0.375 * mu2**-2.5 * var2
    var = var1 / mu2 - cov12 / mu2**2 + 0.25 * var2 / mu2**3
    if n_in is not None:
        if n_in < 1:
            raise ValueError(f"n_in must be >= 1, got {n_in}")
        # MP moments; sparse B: at the ratio whose second moment is E g2 up to O(1/m), n/m at density 1
        lam = n / m if density == 1.0 else (n + 3.0 / density - 3.0) / m
        g2, g3, g4 = 1 + lam, 1 + 3 * lam + lam**2, 1 + 6 * lam + 6 * lam**2 + lam**3
        N = n * n_in  # (a, b, c)/N have covariances 2·g_{i+j}/N given G
        mean += (0.25 * g2**-0.5 + 0.75 * g4 * g2**-2.5 - g3 * g2**-1.5) / N
        var += 2.0 / N * (1.0 - 0.25 / g2 + 0.25 * g4 / g2**3 - g3 / g2**2)
    return mean, var


def predicted_path_angle(
    expansion: float, n_out: int | None = None, n_in: int | None = None, density: float = 1.0
) -> float:
    """Predicted angle (degrees) between a generic ``W`` and ``G W = B B^T W``.

    ``n_out=None``: the ``n_out -> ∞`` limit ``arccos(1 / sqrt(1 + 1/expansion))`` — valid
    for ``W`` whose left singular vectors are isotropic and independent of ``B`` (e.g.
    i.i.d. entries), whatever its singular values. At a fixed ``density`` this limit does
    not depend on the density: pass ``n_out`` to see its effect.

    ``n_out`` given: the expected angle for ``G`` of that size (``n̄ = round(expansion·n_out)``)
    and Gaussian ``W``, to second order in ``1/n_out`` (leading term:
    ``arccos(1 / sqrt(1 + (n_out + 1)/n̄))``); ``n_in`` adds the ``1/(n_out·n_in)``
    fluctuations of ``W`` (``None``: ``n_in -> ∞``). With ``density < 1`` (sparse ``B``)
    the leading term is ``arccos(1 / sqrt(1 + (n_out + 3/density - 2)/n̄))``. See the module
    docstring for the derivation and its measured accuracy.

    Args:
        expansion: ``n̄ / n_out`` (> 0; below 1, ``G`` is singular and the formula still holds).
        n_out: layer output size for the finite-size correction, or ``None``.
        n_in: layer input size (only used with ``n_out``).
        density: fraction of ``B``'s entries kept (the PFA rule's ``density``), in ``(0, 1]``.
    """
    density = _check_density(density)
    if n_out is None:
        lam = 1.0 / _check_expansion(expansion)
        return math.degrees(math.acos(1.0 / math.sqrt(1.0 + lam)))
    c, var = path_cosine_moments(expansion, n_out, n_in, density)
    c = min(c, 1.0)
    if c >= 1.0:
        return 0.0
    # E[arccos(cos)] ≈ arccos(E cos) + arccos''(E cos)·Var(cos)/2, arccos''(c) = -c/(1-c²)^{3/2}
    theta = math.acos(c) - 0.5 * c / (1.0 - c * c) ** 1.5 * var
    return math.degrees(max(theta, 0.0))


def feedback_gram(
    n_out: int,
    expansion: float,
    generator: torch.Generator | None = None,
    orthonormal: bool = False,
    density: float = 1.0,
) -> torch.Tensor:
    """Draw ``B`` as PFA does and return ``G = B B^T`` (``n_out x n_out``, float64).

    ``B`` is ``n_out x n̄`` with ``n̄ = round(expansion·n_out)`` and entries ``N(0, 1/n̄)``
    (docs/design.md, section 'PFA'). With ``orthonormal=True`` (pfa-o) ``B``'s rows are made orthonormal
    by a QR decomposition of an ``n̄ x n_out`` Gaussian matrix, so ``G = I`` up to
    rounding (requires ``expansion ≥ 1``). ``density < 1`` masks ``B`` as the PFA rule
    does (:func:`pfa_fx.rules.pfa.sparsify_feedback`: Bernoulli mask drawn after the
    Gaussian entries, kept entries scaled by ``1/sqrt(density)``, no empty row).
    """
    nbar = nbar_for(n_out, expansion)
    density = _check_density(density)
    if orthonormal and density != 1.0:
        raise ValueError("orthonormal B (pfa-o) has no sparse form: density must be 1.0")
    if orthonormal:
        if nbar < n_out:
            raise ValueError(f"orthonormal B needs expansion >= 1 (n̄={nbar} < n_out={n_out})")
        gauss = torch.randn((nbar, n_out), generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)  # q: n̄ x n_out, orthonormal columns
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        B = q.T
    else:
        B = torch.randn((n_out, nbar), generator=generator, dtype=torch.float64) / math.sqrt(nbar)
        if density < 1.0:
            from .rules.pfa import sparsify_feedback  # the rule's own mask, so theory tests the rule's draw

            B = sparsify_feedback(B, density, generator)
    G = B @ B.T
    return 0.5 * (G + G.T)  # exactly symmetric


def path_angle(W: torch.Tensor, Wb: torch.Tensor) -> float:
    """Angle (degrees) between two tensors of the same shape, as flattened vectors."""
    w, wb = W.reshape(-1).to(torch.float64), Wb.reshape(-1).to(torch.float64)
    cos = torch.dot(w, wb) / (w.norm() * wb.norm())
    return math.degrees(math.acos(float(cos.clamp(-1.0, 1.0))))


def simulate_path_angle(
    n_out: int,
    n_in: int,
    expansion: float,
    trials: int,
    generator: torch.Generator | None = None,
    orthonormal: bool = False,
    density: float = 1.0,
) -> tuple[float, float]:
    """Monte-Carlo angle between a random Gaussian ``W`` (``n_out x n_in``) and ``G W``.

    Each trial draws a fresh ``B`` (via :func:`feedback_gram`, sparse for ``density < 1``)
    and a fresh ``W`` with i.i.d. ``N(0, 1)`` entries, in float64.

    Returns:
        ``(mean, std)`` of the angle in degrees over ``trials`` (std with ``ddof=0``).
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    angles = []
    for _ in range(trials):
        G = feedback_gram(n_out, expansion, generator=generator, orthonormal=orthonormal, density=density)
        W = torch.randn((n_out, n_in), generator=generator, dtype=torch.float64)
        angles.append(path_angle(W, G @ W))
    arr = np.asarray(angles)
    return float(arr.mean()), float(arr.std())
