"""Reproduce the paper's Figure 3: PFA's feedback spectrum and path alignment vs expansion.

Pure simulation (no training). For each expansion ratio ``n̄ / n_out`` it draws ``B``
(``n_out x n̄``, entries ``N(0, 1/n̄)``) as the PFA rule does, and compares with the
Marchenko–Pastur theory in :mod:`pfa_fx.theory`:

(a) eigenvalue histograms of ``G = B B^T`` against the MP density, for a few expansions;
(b) eigenvalue spread (std, and min/max against the MP support edges) vs expansion;
(c) angle between a random Gaussian ``W`` and the converged feedback ``B R = G W``
    vs expansion; pfa-o (orthonormal ``B``, ``G = I``) sits at 0°.

Usage::

    python examples/fig3_expansion.py                  # n_out=256, 10 trials, ~15 s on 2 CPU cores
    python examples/fig3_expansion.py --smoke --out /tmp/fig3

Writes ``fig3_expansion.png``, ``fig3_table.csv`` (one row per expansion) and
``fig3_curves.csv`` (every plotted curve, long format: panel, series, x, y, yerr) to ``--out``.
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
    return args


def sweep(args: argparse.Namespace) -> tuple[list[dict], dict[float, np.ndarray]]:
    """Simulate every expansion; return table rows and pooled eigenvalues for the histograms."""
    gen = torch.Generator().manual_seed(args.seed)
    expansions = sorted(set(np.round(np.logspace(0, 2, args.points), 4).tolist()) | set(HIST_EXPANSIONS))
    rows, pooled = [], {}
    n, n_in = args.n_out, args.n_in
    total = len(expansions) * (args.trials + args.pfa_o_trials)
    with tqdm(total=total, desc="fig3", unit="draw") as bar:
        for e in expansions:
            angles, stds, mins, maxs, evs = [], [], [], [], []
            for _ in range(args.trials):
                G = feedback_gram(n, e, generator=gen)
                ev = torch.linalg.eigvalsh(G).numpy()
                W = torch.randn((n, n_in), generator=gen, dtype=torch.float64)
                angles.append(path_angle(W, G @ W))
                stds.append(ev.std())
                mins.append(ev.min())
                maxs.append(ev.max())
                evs.append(ev)
                bar.update()
            o_angles = []
            for _ in range(args.pfa_o_trials):
                G = feedback_gram(n, e, generator=gen, orthonormal=True)
                W = torch.randn((n, n_in), generator=gen, dtype=torch.float64)
                o_angles.append(path_angle(W, G @ W))
                bar.update()
            low, high = marchenko_pastur_support(1.0 / e)
            rows.append(
                {
                    "expansion": e,
                    "nbar": nbar_for(n, e),
                    "angle_sim_mean": float(np.mean(angles)),
                    "angle_sim_std": float(np.std(angles)),
                    "angle_theory": predicted_path_angle(e),
                    "angle_theory_finite": predicted_path_angle(e, n, n_in),
                    "angle_pfa_o_mean": float(np.mean(o_angles)) if o_angles else float("nan"),
                    "eig_std_sim_mean": float(np.mean(stds)),
                    "eig_std_sim_std": float(np.std(stds)),
                    "eig_std_theory": predicted_eigenvalue_std(e),
                    "eig_std_theory_finite": predicted_eigenvalue_std(e, n),
                    "eig_min_sim_mean": float(np.mean(mins)),
                    "eig_max_sim_mean": float(np.mean(maxs)),
                    "mp_low": low,
                    "mp_high": high,
                }
            )
            if e in HIST_EXPANSIONS:
                pooled[e] = np.concatenate(evs)
    return rows, pooled


def make_figure(args: argparse.Namespace, rows: list[dict], pooled: dict[float, np.ndarray]) -> list[tuple]:
    """Draw the figure; return every plotted curve as (panel, series, x, y, yerr) tuples."""
    curves: list[tuple] = []

    def record(panel: str, series: str, x, y, yerr=None) -> None:
        yerr = [float("nan")] * len(x) if yerr is None else yerr
        curves.extend((panel, series, float(a), float(b), float(c)) for a, b, c in zip(x, y, yerr))

    fig = plt.figure(figsize=(15, 8.5), layout="constrained")
    gs = fig.add_gridspec(2, 12)
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

    fig.suptitle(
        f"PFA feedback spectrum vs expansion (n_out={args.n_out}, n_in={args.n_in}, "
        f"{args.trials} draws per point, seed {args.seed})",
        fontsize=11,
    )
    fig.savefig(args.out / "fig3_expansion.png", dpi=110)
    plt.close(fig)
    return curves


def write_csvs(out: Path, rows: list[dict], curves: list[tuple]) -> None:
    with open(out / "fig3_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "fig3_curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["panel", "series", "x", "y", "yerr"])
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
        f"{'expansion':>9} {'angle sim':>14} {'theory':>7} {'finite':>7} {'pfa-o':>7} {'eig std sim':>16} {'theory':>7}"
    )
    for r in rows:
        print(
            f"{r['expansion']:9.3f} {r['angle_sim_mean']:7.3f}±{r['angle_sim_std']:<6.3f} {r['angle_theory']:7.3f} "
            f"{r['angle_theory_finite']:7.3f} {r['angle_pfa_o_mean']:7.1e} "
            f"{r['eig_std_sim_mean']:8.4f}±{r['eig_std_sim_std']:<7.4f} {r['eig_std_theory']:7.4f}"
        )
    worst = max(abs(r["angle_sim_mean"] - r["angle_theory"]) for r in rows)
    print(
        f"max |angle sim - theory| = {worst:.3f}°; wrote {args.out}/fig3_expansion.png, fig3_table.csv, fig3_curves.csv"
    )
    print(f"elapsed {time.perf_counter() - t0:.1f} s")
    return rows


if __name__ == "__main__":
    main()
