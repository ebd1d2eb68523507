"""Marchenko–Pastur theory of PFA's feedback path (pfa_fx.theory) against simulation.

Everything is float64 with seeded generators, so the tests are deterministic; the
tolerances are set at >= 3 Monte-Carlo standard errors of the quantity tested (stated
next to each) and well below the size of the effects they check.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pfa_fx
from pfa_fx.theory import (
    _gram_moments,
    _iid_gram_moments,
    effective_ratio,
    feedback_gram,
    marchenko_pastur_moments,
    marchenko_pastur_pdf,
    marchenko_pastur_support,
    nbar_for,
    path_angle,
    path_cosine_moments,
    predicted_eigenvalue_std,
    predicted_path_angle,
    simulate_path_angle,
)

EXPANSIONS = [1.0, 2.0, 5.0, 10.0, 30.0, 100.0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small eigvalsh/matmul calls: intra-op threading only adds overhead (10-100x on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mp_integral(ratio: float, power: int, points: int = 20000) -> float:
    """∫ x^power p(x) dx over the support, with x = (a+b)/2 + (b-a)/2·cos φ (midpoint rule in φ).

    The substitution makes the integrand smooth even at ratio 1, where p ~ x^{-1/2} at 0.
    """
    a, b = marchenko_pastur_support(ratio)
    phi = (np.arange(points) + 0.5) * (math.pi / points)
    x = 0.5 * (a + b) + 0.5 * (b - a) * np.cos(phi)
    jac = 0.5 * (b - a) * np.sin(phi)
    return float(np.sum(x**power * marchenko_pastur_pdf(x, ratio) * jac) * (math.pi / points))


# --- the Marchenko–Pastur law itself ---------------------------------------------------


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 1.0, 2.0, 4.0])
def test_mp_pdf_mass_and_moments(ratio):
    mass = _mp_integral(ratio, 0)
    # continuous part: 1 for ratio <= 1, else 1/ratio (the rest is the atom at 0)
    assert mass == pytest.approx(1.0 if ratio <= 1 else 1.0 / ratio, abs=1e-6)
    mean, second = marchenko_pastur_moments(ratio)
    assert (mean, second) == (1.0, 1.0 + ratio)
    # the atom at 0 adds nothing to the moments, so the pdf alone must reproduce them
    assert _mp_integral(ratio, 1) == pytest.approx(mean, abs=1e-6)
    assert _mp_integral(ratio, 2) == pytest.approx(second, abs=1e-6)


def test_mp_pdf_support_and_validation():
    assert marchenko_pastur_support(1.0) == (0.0, 4.0)
    low, high = marchenko_pastur_support(0.25)
    assert (low, high) == pytest.approx((0.25, 2.25))
    assert np.all(marchenko_pastur_pdf(np.array([0.2, 2.3, -1.0]), 0.25) == 0.0)
    assert np.all(marchenko_pastur_pdf(np.linspace(0.26, 2.24, 50), 0.25) > 0.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            marchenko_pastur_support(bad)
    with pytest.raises(ValueError):
        predicted_path_angle(0.0)


def test_mp_cdf_matches_simulated_spectrum():
    # one draw of G at n_out=400, expansion 4: the empirical CDF of its eigenvalues is
    # within O(1/n_out) of the MP CDF (eigenvalue rigidity); 0.02 allows ~8/n_out.
    n_out, expansion = 400, 4.0
    ev = np.sort(torch.linalg.eigvalsh(feedback_gram(n_out, expansion, _gen(1))).numpy())
    lam = n_out / nbar_for(n_out, expansion)
    a, b = marchenko_pastur_support(lam)
    x = np.linspace(a, b, 20001)
    pdf = marchenko_pastur_pdf(x, lam)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(x))])
    emp = np.searchsorted(ev, x, side="right") / n_out
    assert np.max(np.abs(emp - cdf)) < 0.02


# --- the spectrum of G = B B^T --------------------------------------------------------


@pytest.mark.parametrize("expansion", EXPANSIONS)
def test_gram_spectrum_moments_match_mp(expansion):
    n_out, draws = 128, 3
    gen = _gen(int(expansion * 10))
    means, variances = [], []
    for _ in range(draws):
        ev = torch.linalg.eigvalsh(feedback_gram(n_out, expansion, gen)).numpy()
        means.append(ev.mean())
        variances.append(ev.var())
    lam = 1.0 / expansion
    mp_mean, mp_second = marchenko_pastur_moments(lam)
    # mean eigenvalue = tr(G)/n_out has sd sqrt(2/(n_out·n̄)) <= 0.011 per draw: 0.02 is > 3 s.e.
    assert np.mean(means) == pytest.approx(mp_mean, abs=0.02)
    # eigenvalue variance: MP says λ; the exact finite-size value is λ(1 + O(1/n_out)).
    # Its relative sd is ~2%/draw at n_out=128, ~1.2% for 3 draws: 5% is > 4 s.e.
    assert np.mean(variances) == pytest.approx(mp_second - mp_mean**2, rel=0.05)
    assert np.mean(variances) == pytest.approx(predicted_eigenvalue_std(expansion, n_out) ** 2, rel=0.05)


def test_exact_finite_size_second_moment():
    # E tr(G²)/n_out = 1 + (n_out + 1)/n̄ exactly; at n_out = n̄ = 8 that is 2.125 vs MP's 2.
    n_out, expansion, draws = 8, 1.0, 8000
    gen = _gen(2)
    m2 = np.mean(
        [float(torch.trace(G @ G)) / n_out for G in (feedback_gram(n_out, expansion, gen) for _ in range(draws))]
    )
    # per-draw sd ≈ 0.8, so s.e. ≈ 0.009: 0.04 is > 4 s.e.; MP's value 2.0 is ~14 s.e. away
    assert m2 == pytest.approx(1.0 + (n_out + 1) / nbar_for(n_out, expansion), abs=0.04)
    assert abs(m2 - 2.0) > 0.08


# --- path alignment -------------------------------------------------------------------


def test_simulated_path_angle_matches_theory_over_expansion_range():
    # n_out = n_in = 128, 6 draws per point; the per-draw sd of the angle is ~0.25° at
    # expansion 1 and ~0.05° at 100, so the s.e. is <= 0.1°. Tolerances: 0.4° absolute and
    # 3% relative (both must hold) against the finite-size prediction; against the
    # n_out -> ∞ formula 0.5° (it differs from the finite-size value by <= 0.11° here).
    n_out, n_in, trials = 128, 128, 6
    gen = _gen(3)
    for expansion in np.logspace(0, 2, 9):
        mean, std = simulate_path_angle(n_out, n_in, float(expansion), trials, gen)
        finite = predicted_path_angle(float(expansion), n_out, n_in)
        asym = predicted_path_angle(float(expansion))
        assert abs(mean - finite) < 0.4, (expansion, mean, finite)
        assert abs(mean - finite) < 0.03 * finite, (expansion, mean, finite)
        assert abs(mean - asym) < 0.5, (expansion, mean, asym)
        assert 0 < std < 1.0


def test_predicted_path_angle_closed_form():
    # tan θ = 1/sqrt(expansion): 45° at 1, 17.55° at 10, 5.71° at 100
    assert predicted_path_angle(1.0) == pytest.approx(45.0, abs=1e-9)
    assert predicted_path_angle(10.0) == pytest.approx(17.548, abs=1e-3)
    assert predicted_path_angle(100.0) == pytest.approx(5.7106, abs=1e-4)
    angles = [predicted_path_angle(e) for e in np.logspace(-1, 3, 20)]
    assert np.all(np.diff(angles) < 0)
    # finite-size corrections vanish as the layer grows
    assert predicted_path_angle(10.0, 10**6, 10**6) == pytest.approx(predicted_path_angle(10.0), abs=1e-4)


@pytest.mark.parametrize("expansion", [1.0, 2.0])
def test_finite_size_correction_small_layer(expansion):
    # At n_out = n_in = 16 the mean angle is ~0.45° above the n_out -> ∞ value; the
    # second-order prediction gets it to within the Monte-Carlo error. The per-draw sd is
    # ~2.5° at expansion 1, so 8000 draws give s.e. ≈ 0.03°: tolerance 0.15° (~5 s.e.),
    # and the n_out -> ∞ value must be off by > 0.3° (the expected gap is 0.43–0.47°).
    mean, _ = simulate_path_angle(16, 16, expansion, 8000, _gen(4))
    finite = predicted_path_angle(expansion, 16, 16)
    assert abs(mean - finite) < 0.15, (mean, finite)
    assert abs(mean - predicted_path_angle(expansion)) > 0.3


# --- pfa-o ----------------------------------------------------------------------------


@pytest.mark.parametrize(("n_out", "expansion"), [(64, 1.0), (64, 2.5), (128, 10.0), (32, 100.0)])
def test_pfa_o_gram_is_identity(n_out, expansion):
    G = feedback_gram(n_out, expansion, _gen(5), orthonormal=True)
    assert G.dtype == torch.float64
    assert torch.max(torch.abs(G - torch.eye(n_out, dtype=torch.float64))).item() < 1e-12
    mean, _ = simulate_path_angle(n_out, 48, expansion, 2, _gen(6), orthonormal=True)
    assert mean < 1e-4
    with pytest.raises(ValueError):
        feedback_gram(n_out, 0.5, _gen(0), orthonormal=True)


# --- sparse B (density < 1) -------------------------------------------------------------


def test_iid_moment_formulas_reduce_to_wishart():
    # The general formulas (derived for any i.i.d. symmetric entries) at Gaussian moments
    # (κ4, κ6, κ8) = (3, 15, 105) must give the independently known Wishart values.
    for n, m in [(1, 1), (4, 8), (16, 40), (256, 2560), (32, 16)]:
        general = _iid_gram_moments(n, m, 3.0, 15.0, 105.0)
        assert general == pytest.approx(_gram_moments(n, m, 1.0), rel=1e-12), (n, m)


@pytest.mark.parametrize(("n", "m", "density"), [(4, 8, 0.3), (3, 6, 0.5)])
def test_sparse_gram_moments_match_simulation(n, m, density):
    # 80,000 sparse B (as the rule draws them: Bernoulli mask, kept entries / sqrt(density),
    # drawn in one batch). For E g2 the s.e. is sqrt(Var g2 / N) (0.010 at (4, 8, 0.3)):
    # tolerance 5 s.e.; the Wishart value (density 1) is 25+ s.e. away. Var g1 and
    # Cov(g1, g2) have relative s.e. <= 2.5 %: tolerance 10 % (their Wishart values are
    # 2.5-6.5x smaller).
    N = 80_000
    gen = torch.Generator().manual_seed(11)
    X = torch.randn((N, n, m), generator=gen, dtype=torch.float64) / math.sqrt(m)
    B = X * (torch.rand((N, n, m), generator=gen, dtype=torch.float64) < density) / math.sqrt(density)
    G = B @ B.mT
    g1 = (G.diagonal(dim1=1, dim2=2).sum(-1) / n).numpy()
    g2 = ((G * G).sum((1, 2)) / n).numpy()
    mu2, var1, cov12, var2 = _gram_moments(n, m, density)
    assert mu2 == pytest.approx(1.0 + (n + 3.0 / density - 2) / m, rel=1e-14)
    se = math.sqrt(var2 / N)
    assert abs(g2.mean() - mu2) < 5 * se, (g2.mean(), mu2, se)
    assert abs(g2.mean() - _gram_moments(n, m, 1.0)[0]) > 25 * se
    assert g1.mean() == pytest.approx(1.0, abs=5 * math.sqrt(var1 / N))
    assert g1.var() == pytest.approx(var1, rel=0.1)
    assert np.cov(g1, g2)[0, 1] == pytest.approx(cov12, rel=0.1)


@pytest.mark.parametrize(
    ("n_out", "expansion", "density", "trials"),
    [(64, 1.0, 0.2, 200), (64, 4.0, 0.1, 200), (64, 10.0, 0.5, 200), (16, 2.0, 0.3, 2000)],
)
def test_sparse_path_angle_matches_theory(n_out, expansion, density, trials):
    # The simulated mean angle (sparse B drawn by the rule's own mask) against the
    # finite-size prediction: tolerance 4 Monte-Carlo s.e. (std/sqrt(trials), 0.03–0.07° here)
    # plus 0.05° for the second-order expansion. The dense prediction (0.6–5° away) must be
    # rejected by the same simulation.
    mean, std = simulate_path_angle(n_out, n_out, expansion, trials, _gen(12), density=density)
    se = std / math.sqrt(trials)
    predicted = predicted_path_angle(expansion, n_out, n_out, density=density)
    assert abs(mean - predicted) < 4 * se + 0.05, (mean, predicted, se)
    assert abs(mean - predicted_path_angle(expansion, n_out, n_out)) > 8 * se + 0.1
    # the leading term, tan² θ ≈ λ_eff = (n_out + 3/density - 2)/n̄, is within 0.15° of the
    # full prediction at n_out = 64 (the second-order terms reach 0.9° at n_out = 16)
    lam = effective_ratio(expansion, n_out, density)
    assert lam == pytest.approx((n_out + 3 / density - 2) / nbar_for(n_out, expansion), rel=1e-14)
    assert math.degrees(math.atan(math.sqrt(lam))) == pytest.approx(predicted, abs=0.15 if n_out >= 64 else 1.0)


def test_density_one_gives_the_dense_numbers_exactly():
    # values of the dense theory before density existed (pfa_fx.theory at commit 33da415)
    assert predicted_path_angle(2.0, 16, 16) == 35.72807709571056
    assert predicted_path_angle(10.0, 64) == 17.669738660755783
    assert predicted_eigenvalue_std(4.0, 32) == 0.5072713462733727
    assert path_cosine_moments(3.0, 8, 8) == (0.8617343396850357, 0.0012778574527993443)
    for e in (0.5, 1.0, 3.7, 100.0):
        for n_out, n_in in ((None, None), (4, None), (16, 16), (128, 64)):
            assert predicted_path_angle(e, n_out, n_in, density=1.0) == predicted_path_angle(e, n_out, n_in)
        assert predicted_eigenvalue_std(e, 32, density=1.0) == predicted_eigenvalue_std(e, 32)
        assert effective_ratio(e, 32) == (32 + 1) / nbar_for(32, e)
        assert effective_ratio(e, 32) == pytest.approx(_gram_moments(32, nbar_for(32, e), 1.0)[0] - 1, rel=1e-13)
    for orthonormal in (False, True):
        a = simulate_path_angle(16, 8, 3.0, 3, _gen(7), orthonormal=orthonormal)
        assert simulate_path_angle(16, 8, 3.0, 3, _gen(7), orthonormal=orthonormal, density=1.0) == a
    assert torch.equal(feedback_gram(8, 2.0, _gen(0), density=1.0), feedback_gram(8, 2.0, _gen(0)))
    # the n_out -> ∞ limit at fixed density is the dense one; sparsity is a 1/n̄ effect
    assert predicted_path_angle(10.0, density=0.1) == predicted_path_angle(10.0)
    assert predicted_path_angle(10.0, 10**6, density=0.1) == pytest.approx(predicted_path_angle(10.0), abs=1e-3)
    assert predicted_path_angle(10.0, 256, density=0.1) > predicted_path_angle(10.0, 256) + 0.5
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        predicted_path_angle(10.0, 64, density=0.0)
    with pytest.raises(ValueError, match=r"density must be 1\.0"):
        feedback_gram(8, 2.0, _gen(0), orthonormal=True, density=0.5)


# --- the library's converged PFA feedback ------------------------------------------------


@pytest.mark.parametrize(("rule", "expansion"), [("pfa", 1.0), ("pfa", 10.0), ("pfa-o", 2.0)])
def test_library_converged_feedback_matches_theory(rule, expansion):
    # Set R to its weight-decay fixed point B^T W: the library's path alignment is then the
    # angle between W and B B^T W, which the theory predicts (W: default nn.Linear init,
    # i.i.d. uniform entries, independent of B). Tolerance 0.5° (s.d. of one draw ≈ 0.2°).
    n_out, n_in = 128, 256
    torch.manual_seed(0)
    gm = pfa_fx.convert(nn.Sequential(nn.Linear(n_in, n_out)).double(), rule=rule, expansion=expansion, seed=0)
    ((name, node),) = list(pfa_fx.feedback_modules(gm))
    with torch.no_grad():
        B = node.B[0]  # (n_out, n̄)
        node.R.copy_(B.T @ node.weight)
    angle, _ = pfa_fx.alignment(gm)[name]
    assert angle == pytest.approx(path_angle(node.weight, B @ B.T @ node.weight), abs=1e-6)
    expected = 0.0 if rule == "pfa-o" else predicted_path_angle(expansion, n_out, n_in)
    assert angle == pytest.approx(expected, abs=0.5)


# --- the example ----------------------------------------------------------------------


def test_fig3_example_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "examples" / "fig3_expansion.py"
    spec = importlib.util.spec_from_file_location("fig3_expansion", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--smoke", "--out", str(tmp_path)])
    png = tmp_path / "fig3_expansion.png"
    assert png.exists() and png.stat().st_size > 10_000
    for name in ("fig3_table.csv", "fig3_curves.csv"):
        assert (tmp_path / name).exists()
    lines = (tmp_path / "fig3_table.csv").read_text().strip().splitlines()
    assert lines[0].startswith("density,expansion,")
    assert len(lines) == 1 + len(rows) >= 5
    assert {r["density"] for r in rows} == {1.0, 0.5, 0.2, 0.1}
    curves = (tmp_path / "fig3_curves.csv").read_text()
    assert curves.startswith("panel,series,density,x,y,yerr")
    for series in ("angle_theory", "angle_sim", "angle_pfa_o_sim", "std_theory", "std_sim", "mp_pdf_exp10"):
        assert f",{series}," in curves
    for series in ("angle_theory_sparse", "angle_sim_sparse", "excess_sim", "angle_sim_vs_expansion_x_density"):
        assert f",{series},0.1," in curves
    for r in rows:  # n_out=32, 2 draws: per-draw sd <= ~1° dense, up to 2.6° at density 0.1
        assert abs(r["angle_sim_mean"] - r["angle_theory_finite"]) < (2.0 if r["density"] == 1.0 else 3.0)
        if r["density"] == 1.0:
            assert r["angle_pfa_o_mean"] < 1e-4
        else:
            assert math.isnan(r["angle_pfa_o_mean"])
