"""Random-matrix theory of PFA's feedback path (the paper's Proposition 3 and Figure 3).

In PFA the feedback weight of a layer is ``W_b = B·R`` with ``B`` (``n_out x n̄``) fixed
random, entries ``N(0, 1/n̄)``, ``n̄ = expansion·n_out``, and ``R`` plastic. With weight
decay, ``R -> B^T W`` and so ``W_b -> B B^T W = G W`` (DESIGN.md §2–3). How well the
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
Figure 3 as DESIGN.md describes it), not an exact law for every trained network.

pfa-o draws ``B`` with orthonormal rows, so ``G = I`` exactly and θ = 0 at any
expansion ≥ 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
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


def predicted_eigenvalue_std(expansion: float, n_out: int | None = None) -> float:
    """Predicted standard deviation of the eigenvalues of ``G = B B^T``.

    Asymptotically ``sqrt(λ) = 1/sqrt(expansion)``. With ``n_out`` given, returns the
    square root of the exact expected within-matrix eigenvalue variance of the Wishart
    ``G``: ``E[tr G²/n - (tr G/n)²] = (n+1)/n̄ - 2/(n·n̄)`` with ``n = n_out``.
    """
    if n_out is None:
        return 1.0 / math.sqrt(_check_expansion(expansion))
    nbar = nbar_for(n_out, expansion)
    return math.sqrt((n_out + 1) / nbar - 2.0 / (n_out * nbar))


def path_cosine_moments(expansion: float, n_out: int, n_in: int | None = None) -> tuple[float, float]:
    """Mean and variance of ``cos θ(W, G W)`` to second order in ``1/n_out`` (and ``1/(n_out·n_in)``).

    Delta-method expansion of ``cos θ = a / sqrt(b·c)``, ``a = tr(WᵀGW)``, ``b = ‖W‖²``,
    ``c = ‖GW‖²``, around the exact Wishart moments of ``G`` listed in the module
    docstring, for ``W`` with i.i.d. ``N(0, 1)`` entries. ``n_in=None`` means ``n_in -> ∞``
    (no fluctuations from ``W``).
    """
    if n_out < 1:
        raise ValueError(f"n_out must be >= 1, got {n_out}")
    n, m = n_out, nbar_for(n_out, expansion)
    mu2 = 1.0 + (n + 1) / m  # E tr(G²)/n, exact
    var1 = 2.0 / (n * m)
    cov12 = 4.0 * (n + m + 1) / (n * m * m)
    var2 = 4.0 * (2 * m * m + 5 * n * m + 2 * n * n + 5 * n + 5 * m + 5) / (n * m**3)
    # f(g1, g2) = g1 / sqrt(g2): f_1 = mu2^-1/2, f_2 = -mu2^-3/2 / 2, f_11 = 0,
    # f_12 = -mu2^-3/2 / 2, f_22 = 3 mu2^-5/2 / 4 (at g1 = 1)
    mean = mu2**-0.5 - 0.5 * mu2**-1.5 * cov12 + 0.375 * mu2**-2.5 * var2
    var = var1 / mu2 - cov12 / mu2**2 + 0.25 * var2 / mu2**3
    if n_in is not None:
        if n_in < 1:
            raise ValueError(f"n_in must be >= 1, got {n_in}")
        lam = n / m
        g2, g3, g4 = 1 + lam, 1 + 3 * lam + lam**2, 1 + 6 * lam + 6 * lam**2 + lam**3
        N = n * n_in  # (a, b, c)/N have covariances 2·g_{i+j}/N given G
        mean += (0.25 * g2**-0.5 + 0.75 * g4 * g2**-2.5 - g3 * g2**-1.5) / N
        var += 2.0 / N * (1.0 - 0.25 / g2 + 0.25 * g4 / g2**3 - g3 / g2**2)
    return mean, var


def predicted_path_angle(expansion: float, n_out: int | None = None, n_in: int | None = None) -> float:
    """Predicted angle (degrees) between a generic ``W`` and ``G W = B B^T W``.

    ``n_out=None``: the ``n_out -> ∞`` limit ``arccos(1 / sqrt(1 + 1/expansion))`` — valid
    for ``W`` whose left singular vectors are isotropic and independent of ``B`` (e.g.
    i.i.d. entries), whatever its singular values.

    ``n_out`` given: the expected angle for ``G`` of that size (``n̄ = round(expansion·n_out)``)
    and Gaussian ``W``, to second order in ``1/n_out`` (leading term:
    ``arccos(1 / sqrt(1 + (n_out + 1)/n̄))``); ``n_in`` adds the ``1/(n_out·n_in)``
    fluctuations of ``W`` (``None``: ``n_in -> ∞``). See the module docstring for the
    derivation and its measured accuracy.

    Args:
        expansion: ``n̄ / n_out`` (> 0; below 1, ``G`` is singular and the formula still holds).
        n_out: layer output size for the finite-size correction, or ``None``.
        n_in: layer input size (only used with ``n_out``).
    """
    if n_out is None:
        lam = 1.0 / _check_expansion(expansion)
        return math.degrees(math.acos(1.0 / math.sqrt(1.0 + lam)))
    c, var = path_cosine_moments(expansion, n_out, n_in)
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
) -> torch.Tensor:
    """Draw ``B`` as PFA does and return ``G = B B^T`` (``n_out x n_out``, float64).

    ``B`` is ``n_out x n̄`` with ``n̄ = round(expansion·n_out)`` and entries ``N(0, 1/n̄)``
    (DESIGN.md §2). With ``orthonormal=True`` (pfa-o) ``B``'s rows are made orthonormal
    by a QR decomposition of an ``n̄ x n_out`` Gaussian matrix, so ``G = I`` up to
    rounding (requires ``expansion ≥ 1``).
    """
    nbar = nbar_for(n_out, expansion)
    if orthonormal:
        if nbar < n_out:
            raise ValueError(f"orthonormal B needs expansion >= 1 (n̄={nbar} < n_out={n_out})")
        gauss = torch.randn((nbar, n_out), generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)  # q: n̄ x n_out, orthonormal columns
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        B = q.T
    else:
        B = torch.randn((n_out, nbar), generator=generator, dtype=torch.float64) / math.sqrt(nbar)
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
) -> tuple[float, float]:
    """Monte-Carlo angle between a random Gaussian ``W`` (``n_out x n_in``) and ``G W``.

    Each trial draws a fresh ``B`` (via :func:`feedback_gram`) and a fresh ``W`` with
    i.i.d. ``N(0, 1)`` entries, in float64.

    Returns:
        ``(mean, std)`` of the angle in degrees over ``trials`` (std with ``ddof=0``).
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    angles = []
    for _ in range(trials):
        G = feedback_gram(n_out, expansion, generator=generator, orthonormal=orthonormal)
        W = torch.randn((n_out, n_in), generator=generator, dtype=torch.float64)
        angles.append(path_angle(W, G @ W))
    arr = np.asarray(angles)
    return float(arr.mean()), float(arr.std())
