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

*Assumption*: the left singular vectors of ``W`` are isotropic (Haar-distributed) and
independent of ``B`` — e.g. ``W`` with i.i.d. Gaussian entries, or any ``W`` drawn
independently of ``B`` and then rotated at random on its output side. Writing
``W = U Σ Vᵀ`` and averaging over ``U`` gives exactly
``E_U tr(Wᵀ G W) = ‖W‖²·tr(G)/n_out`` and ``E_U ‖G W‖² = ‖W‖²·tr(G²)/n_out``; both
quadratic forms concentrate when ``n_out`` (and the rank of ``W``) are large, so

    cos θ -> m1 / sqrt(m2) = 1 / sqrt(1 + λ) = 1 / sqrt(1 + 1/expansion),

with ``m1, m2`` the first two spectral moments of ``G`` (the overall scale of ``B``
cancels). At expansion 10 that is 17.55°, at 1 it is 45°, at 100 it is 5.68°.

Finite size. The exact Wishart moments are ``E tr(G)/n_out = 1`` and
``E tr(G²)/n_out = 1 + (n_out + 1)/n̄`` (from ``E[(XXᵀ)_ii²] = n̄² + 2n̄`` and
``E[(XXᵀ)_ij²] = n̄`` for ``i ≠ j``), so replacing ``λ`` by ``λ_eff = (n_out + 1)/n̄``
(``n̄ = round(expansion·n_out)`` as the PFA rule draws it) gives the leading finite-size
correction. The remaining corrections — fluctuations of ``W`` (a delta-method term of
order ``1/(n_out·n_in)``) and of ``tr G``, ``tr G²`` (order ``1/n_out²``) — are
negligible for layer sizes of practical interest.

Caveat: a *trained* ``W`` is not independent of ``B`` (under PFA the error that trains
``W`` has itself passed through ``G``), so this predicts the alignment of the
converged feedback path for a generic ``W``, the quantity plotted in the paper's
Figure 3, not an exact law for every trained network.

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


def _lambda_eff(expansion: float, n_out: int | None) -> float:
    """``λ`` in the limit, or ``(n_out + 1)/n̄`` for the exact Wishart second moment."""
    if n_out is None:
        return 1.0 / _check_expansion(expansion)
    if n_out < 1:
        raise ValueError(f"n_out must be >= 1, got {n_out}")
    return (n_out + 1) / nbar_for(n_out, expansion)


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


def predicted_path_angle(expansion: float, n_out: int | None = None) -> float:
    """Predicted angle (degrees) between a generic ``W`` and ``G W = B B^T W``.

    ``arccos(1 / sqrt(1 + λ))`` with ``λ = 1/expansion`` (``n_out=None``: the
    ``n_out -> ∞`` limit), or with ``λ_eff = (n_out + 1) / round(expansion·n_out)`` (the
    exact finite-size second moment of the Wishart spectrum). Valid for ``W`` whose
    left singular vectors are isotropic and independent of ``B`` (e.g. i.i.d. Gaussian
    ``W``); see the module docstring for the derivation and its error terms.

    Args:
        expansion: ``n̄ / n_out`` (> 0; below 1, ``G`` is singular and the formula still holds).
        n_out: layer output size for the finite-size correction, or ``None``.
    """
    lam = _lambda_eff(expansion, n_out)
    return math.degrees(math.acos(1.0 / math.sqrt(1.0 + lam)))


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
