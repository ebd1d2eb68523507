"""Reproduce the paper's Figure 3: PFA's feedback spectrum and path alignment vs expansion.

Pure simulation (no training). For each expansion ratio ``n̄ / n_out`` it draws ``B``
(``n_out x n̄``, entries ``N(0, 1/n̄)``) as the PFA rule does, and compares with the
Marchenko–Pastur theory in :mod:`pfa_fx.theory`:

(a) eigenvalue histograms of ``G = B B^T`` against the MP density, for a few expansions;
(b) eigenvalue spread (std, and min/max against the MP support edges) vs expansion;
(c) angle between a random Gaussian ``W`` and the converged feedback ``B R = G W``
    vs expansion; pfa-o (orthonormal ``B``, ``G = I``) sits at 0°;
(d)–(f) the same angle for sparse feedback (``density`` < 1: each error unit reaches a
    random fraction ``density`` of the output units), simulated and predicted
    (``tan² θ ≈ (n_out + 3/density - 2)/n̄``): against expansion, as the excess over dense
    feedback, and against expansion × density.

Usage::

    python examples/fig3_expansion.py                  # n_out=256, 10 trials, 4 densities, ~1.5 min on 1 CPU core
    python examples/fig3_expansion.py --smoke --out /tmp/fig3

Writes ``fig3_expansion.png``, ``fig3_table.csv`` (one row per density and expansion) and
``fig3_curves.csv`` (every plotted curve, long format: panel, series, density, x, y, yerr)
to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

from pfa_fx.theory import (
    effective_ratio,
    feedback_gram,
    marchenko_pastur_pdf,
    marchenko_pastur_support,
    nbar_for,
    path_angle,
    predicted_eigenvalue_std,
    predicted_path_angle,
)

HIST_EXPANSIONS = (1.0, 2.0, 10.0, 100.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-out", type=int, default=256, help="layer output size n_out (default 256)")
    p.add_argument("--n-in", type=int, default=None, help="layer input size for W (default n_out)")
    p.add_argument("--trials", type=int, default=10, help="draws of (B, W) per expansion (default 10)")
    p.add_argument("--points", type=int, default=12, help="log-spaced expansions in [1, 100] (default 12)")
    p.add_argument(
        "--densities",
        type=float,
        nargs="+",
        default=[1.0, 0.5, 0.2, 0.1],
        help="densities of B for panels (d)-(f), in (0, 1]; 1.0 (dense) is always included (default 1 0.5 0.2 0.1)",
    )
    p.add_argument("--pfa-o-trials", type=int, default=1, help="draws of orthonormal B per expansion (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the many small eigvalsh calls run far faster single-threaded)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/fig3"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a quick check")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_out, args.trials, args.points, args.pfa_o_trials = 32, 2, 4, 1
    if args.n_in is None:
        args.n_in = args.n_out
    if not all(0 < d <= 1 for d in args.densities):
        p.error(f"--densities must lie in (0, 1], got {args.densities}")
    # dense first: panels (a)-(c) use it, and its draws then come first from the seeded
    # generator, exactly as before densities existed
    args.densities = sorted(set(args.densities) | {1.0}, reverse=True)
    return args


def sweep(args: argparse.Namespace) -> tuple[list[dict], dict[float, np.ndarray]]:
    """Simulate every (density, expansion); return table rows and pooled dense eigenvalues for the histograms."""
    gen = torch.Generator().manual_seed(args.seed)
    expansions = sorted(set(np.round(np.logspace(0, 2, args.points), 4).tolist()) | set(HIST_EXPANSIONS))
    rows, pooled = [], {}
    n, n_in = args.n_out, args.n_in
    total = len(expansions) * (len(args.densities) * args.trials + args.pfa_o_trials)
    with tqdm(total=total, desc="fig3", unit="draw") as bar:
        for d in args.densities:
            for e in expansions:
                angles, stds, mins, maxs, evs = [], [], [], [], []
                for _ in range(args.trials):
                    G = feedback_gram(n, e, generator=gen, density=d)
                    ev = torch.linalg.eigvalsh(G).numpy()
                    W = torch.randn((n, n_in), generator=gen, dtype=torch.float64)
                    angles.append(path_angle(W, G @ W))
                    stds.append(ev.std())
                    mins.append(ev.min())
                    maxs.append(ev.max())
                    evs.append(ev)
                    bar.update()
                o_angles = []  # pfa-o has no sparse form: dense rows only
                for _ in range(args.pfa_o_trials if d == 1.0 else 0):
                    G = feedback_gram(n, e, generator=gen, orthonormal=True)
                    W = torch.randn((n, n_in), generator=gen, dtype=torch.float64)
                    o_angles.append(path_angle(W, G @ W))
                    bar.update()
                low, high = marchenko_pastur_support(1.0 / e)
                rows.append(
                    {
                        "density": d,
                        "expansion": e,
                        "nbar": nbar_for(n, e),
                        "lambda_eff": effective_ratio(e, n, d),
                        "angle_sim_mean": float(np.mean(angles)),
                        "angle_sim_std": float(np.std(angles)),
                        "angle_theory": predicted_path_angle(e),
                        "angle_theory_finite": predicted_path_angle(e, n, n_in, density=d),
                        "angle_pfa_o_mean": float(np.mean(o_angles)) if o_angles else float("nan"),
                        "eig_std_sim_mean": float(np.mean(stds)),
                        "eig_std_sim_std": float(np.std(stds)),
                        "eig_std_theory": predicted_eigenvalue_std(e),
                        "eig_std_theory_finite": predicted_eigenvalue_std(e, n, density=d),
                        "eig_min_sim_mean": float(np.mean(mins)),
                        "eig_max_sim_mean": float(np.mean(maxs)),
                        "mp_low": low,
                        "mp_high": high,
                    }
                )
                if d == 1.0 and e in HIST_EXPANSIONS:
                    pooled[e] = np.concatenate(evs)
    return rows, pooled


def make_figure(args: argparse.Namespace, rows: list[dict], pooled: dict[float, np.ndarray]) -> list[tuple]:
    """Draw the figure; return every plotted curve as (panel, series, x, y, yerr) tuples."""
    curves: list[tuple] = []

    def record(panel: str, series: str, x, y, yerr=None, density: float = 1.0) -> None:
        yerr = [float("nan")] * len(x) if yerr is None else yerr
        curves.extend((panel, series, density, float(a), float(b), float(c)) for a, b, c in zip(x, y, yerr))

    all_rows, rows = rows, [r for r in rows if r["density"] == 1.0]
    fig = plt.figure(figsize=(15, 12.5), layout="constrained")
    gs = fig.add_gridspec(3, 12)
    # (a) spectra
    for i, e in enumerate(HIST_EXPANSIONS):
        ax = fig.add_subplot(gs[0, 3 * i : 3 * i + 3])
        ev = pooled[e]
        low, high = marchenko_pastur_support(1.0 / e)
        edges = np.linspace(0.0 if e <= 1.0 else low - 0.05 * (high - low), high + 0.05 * (high - low), 41)
        dens, edges = np.histogram(ev, bins=edges, density=True)
        centers = 0.5 * (edges[1:] + edges[:-1])
        ax.bar(centers, dens, width=np.diff(edges), color="tab:blue", alpha=0.5, label="simulation")
        xs = np.linspace(max(low, 1e-3 * high), high, 400)
        pdf = marchenko_pastur_pdf(xs, 1.0 / e)
        ax.plot(xs, pdf, color="k", lw=1.5, label="Marchenko–Pastur")
        ax.set_ylim(0, 1.15 * max(dens.max(), np.percentile(pdf, 90)))
        ax.set_title(f"(a) eigenvalues of $BB^T$, expansion {e:g}", fontsize=10)
        ax.set_xlabel("eigenvalue")
        if i == 0:
            ax.set_ylabel("density")
            ax.legend(fontsize=8)
        record("a", f"hist_sim_exp{e:g}", centers, dens)
        record("a", f"mp_pdf_exp{e:g}", xs, pdf)

    ex = np.array([r["expansion"] for r in rows])
    dense = np.logspace(0, 2, 200)
    theory_std = [predicted_eigenvalue_std(e) for e in dense]
    theory_ang = [predicted_path_angle(e) for e in dense]
    lo_hi = np.array([marchenko_pastur_support(1.0 / e) for e in dense])

    # (b) spread: std
    ax = fig.add_subplot(gs[1, 0:4])
    y, yerr = [r["eig_std_sim_mean"] for r in rows], [r["eig_std_sim_std"] for r in rows]
    ax.plot(dense, theory_std, "k-", label=r"MP: $\sqrt{\lambda}=1/\sqrt{\mathrm{expansion}}$")
    ax.errorbar(
        ex,
        y,
        yerr=yerr,
        fmt="o",
        color="tab:blue",
        capsize=3,
        label=f"simulation, $n_{{out}}$={args.n_out} (bars: ±1 s.d.)",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("expansion ratio $\\bar n / n_{out}$")
    ax.set_ylabel("std of eigenvalues of $BB^T$")
    ax.set_title("(b) eigenvalue spread", fontsize=10)
    ax.legend(fontsize=8)
    record("b", "std_theory", dense, theory_std)
    record("b", "std_sim", ex, y, yerr)

    # (b') spread: support edges
    ax = fig.add_subplot(gs[1, 4:8])
    ax.fill_between(dense, lo_hi[:, 0], lo_hi[:, 1], color="0.85", label="MP support")
    ax.plot(dense, lo_hi[:, 0], "k-", lw=1)
    ax.plot(dense, lo_hi[:, 1], "k-", lw=1)
    y_min, y_max = [r["eig_min_sim_mean"] for r in rows], [r["eig_max_sim_mean"] for r in rows]
    ax.plot(ex, y_max, "^", color="tab:red", label="simulated max")
    ax.plot(ex, y_min, "v", color="tab:green", label="simulated min")
    ax.axhline(1.0, color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("expansion ratio $\\bar n / n_{out}$")
    ax.set_ylabel("eigenvalue")
    ax.set_title("(b) spectrum edges $(1\\pm\\sqrt{\\lambda})^2$", fontsize=10)
    ax.legend(fontsize=8)
    record("b", "mp_low", dense, lo_hi[:, 0])
    record("b", "mp_high", dense, lo_hi[:, 1])
    record("b", "min_sim", ex, y_min)
    record("b", "max_sim", ex, y_max)

    # (c) path alignment
    ax = fig.add_subplot(gs[1, 8:12])
    y, yerr = [r["angle_sim_mean"] for r in rows], [r["angle_sim_std"] for r in rows]
    y_o = [r["angle_pfa_o_mean"] for r in rows]
    ax.plot(dense, theory_ang, "k-", label=r"theory: $\arccos(1/\sqrt{1+1/\mathrm{expansion}})$")
    ax.errorbar(ex, y, yerr=yerr, fmt="o", color="tab:blue", capsize=3, label="PFA simulation (bars: ±1 s.d.)")
    ax.plot(ex, y_o, "s", color="tab:orange", label="PFA-o simulation")
    ax.axhline(0.0, color="tab:orange", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_ylim(-2, 48)
    ax.set_xlabel("expansion ratio $\\bar n / n_{out}$")
    ax.set_ylabel("angle between $W$ and $BR = BB^TW$ (deg)")
    ax.set_title("(c) path alignment (random $W$)", fontsize=10)
    ax.legend(fontsize=8)
    record("c", "angle_theory", dense, theory_ang)
    record("c", "angle_sim", ex, y, yerr)
    record("c", "angle_pfa_o_sim", ex, y_o)

    sparse_panels(fig, gs, args, all_rows, dense, theory_ang, record)
    fig.suptitle(
        f"PFA feedback spectrum vs expansion (n_out={args.n_out}, n_in={args.n_in}, "
        f"{args.trials} draws per point, seed {args.seed}); (d)–(f): sparse B, densities "
        f"{', '.join(f'{d:g}' for d in args.densities)}",
        fontsize=11,
    )
    fig.savefig(args.out / "fig3_expansion.png", dpi=110)
    plt.close(fig)
    return curves


def sparse_panels(fig, gs, args: argparse.Namespace, rows: list[dict], dense: np.ndarray, theory_ang, record) -> None:
    """Row 3: path alignment with sparse ``B`` (finite-size theory at this ``n_out``, ``n_in``)."""
    n, n_in = args.n_out, args.n_in
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(args.densities)))
    ax_d = fig.add_subplot(gs[2, 0:4])
    ax_e = fig.add_subplot(gs[2, 4:8])
    ax_f = fig.add_subplot(gs[2, 8:12])
    dense_finite = np.array([predicted_path_angle(e, n, n_in) for e in dense])
    ax_d.plot(dense, theory_ang, "k:", lw=1, label=r"$n_{out}\to\infty$ (any density)")
    for d, color in zip(args.densities, colors):
        rs = [r for r in rows if r["density"] == d]
        ex = np.array([r["expansion"] for r in rs])
        y = np.array([r["angle_sim_mean"] for r in rs])
        sd = np.array([r["angle_sim_std"] for r in rs])
        se = sd / np.sqrt(args.trials)
        theory = np.array([predicted_path_angle(e, n, n_in, density=d) for e in dense])
        base = np.array([predicted_path_angle(e, n, n_in) for e in ex])
        label = f"density {d:g}"
        ax_d.plot(dense, theory, "-", color=color, lw=1.2)
        ax_d.errorbar(ex, y, yerr=sd, fmt="o", ms=4, color=color, capsize=2, label=label)
        ax_e.plot(dense, theory - dense_finite, "-", color=color, lw=1.2)
        ax_e.errorbar(ex, y - base, yerr=se, fmt="o", ms=4, color=color, capsize=2, label=label)
        ax_f.plot(dense * d, theory, "-", color=color, lw=1.2)
        ax_f.errorbar(ex * d, y, yerr=sd, fmt="o", ms=4, color=color, capsize=2, label=label)
        record("d", "angle_theory_sparse", dense, theory, density=d)
        record("d", "angle_sim_sparse", ex, y, sd, density=d)
        record("e", "excess_theory", dense, theory - dense_finite, density=d)
        record("e", "excess_sim", ex, y - base, se, density=d)
        record("f", "angle_sim_vs_expansion_x_density", ex * d, y, sd, density=d)
    for ax in (ax_d, ax_e, ax_f):
        ax.set_xscale("log")
    ax_d.set_xlabel("expansion ratio $\\bar n / n_{out}$")
    ax_d.set_ylabel("angle between $W$ and $BB^TW$ (deg)")
    ax_d.set_title(
        f"(d) sparse $B$: lines = theory at $n_{{out}}$={n}, " + r"$\tan^2\theta\approx(n_{out}+3/p-2)/\bar n$",
        fontsize=10,
    )
    ax_d.legend(fontsize=8)
    ax_e.axhline(0.0, color="k", lw=0.8)
    ax_e.set_xlabel("expansion ratio $\\bar n / n_{out}$")
    ax_e.set_ylabel("angle minus dense theory (deg)")
    ax_e.set_title("(e) cost of sparsity (bars: ±1 s.e.)", fontsize=10)
    ax_e.legend(fontsize=8)
    ax_f.set_xlabel("expansion × density (mean connections per output unit / $n_{out}$)")
    ax_f.set_ylabel("angle between $W$ and $BB^TW$ (deg)")
    ax_f.set_title("(f) the same against expansion × density: no collapse", fontsize=10)
    ax_f.legend(fontsize=8)


def write_csvs(out: Path, rows: list[dict], curves: list[tuple]) -> None:
    with open(out / "fig3_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "fig3_curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["panel", "series", "density", "x", "y", "yerr"])
        w.writerows(curves)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the sweep, write PNG + CSVs to ``--out``, print a summary table; return the rows."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows, pooled = sweep(args)
    finally:
        torch.set_num_threads(threads)
    curves = make_figure(args, rows, pooled)
    write_csvs(args.out, rows, curves)
    print(
        f"{'density':>7} {'expansion':>9} {'angle sim':>14} {'theory':>7} {'finite':>7} {'pfa-o':>7} "
        f"{'eig std sim':>16} {'finite':>7}"
    )
    for r in rows:
        print(
            f"{r['density']:7.3g} {r['expansion']:9.3f} {r['angle_sim_mean']:7.3f}±{r['angle_sim_std']:<6.3f} "
            f"{r['angle_theory']:7.3f} {r['angle_theory_finite']:7.3f} {r['angle_pfa_o_mean']:7.1e} "
            f"{r['eig_std_sim_mean']:8.4f}±{r['eig_std_sim_std']:<7.4f} {r['eig_std_theory_finite']:7.4f}"
        )
    dense_rows = [r for r in rows if r["density"] == 1.0]
    worst = max(abs(r["angle_sim_mean"] - r["angle_theory"]) for r in dense_rows)
    worst_finite = max(abs(r["angle_sim_mean"] - r["angle_theory_finite"]) for r in rows)
    print(
        f"dense: max |angle sim - theory| = {worst:.3f}°; every density: max |angle sim - finite-size theory| = "
        f"{worst_finite:.3f}°; wrote {args.out}/fig3_expansion.png, fig3_table.csv, fig3_curves.csv"
    )
    print(f"elapsed {time.perf_counter() - t0:.1f} s")
    return rows


if __name__ == "__main__":
    main()
