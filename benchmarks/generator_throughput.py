"""Throughput of pfa_fx.counter_rng's Gaussian draws against torch.randn, and what redrawing a
ResNet-18's feedback weights costs next to one training step.

Measures numbers/s of: the eager counter-based draw (torch ops, one pass per op), the compiled
kernel (torch.compile/inductor, the path ``gaussian`` takes where inductor works), and
``torch.randn`` with a CPU generator (Mersenne-Twister) in float32 and float64, all into
preallocated outputs; then the time to draw every weight of torchvision's ResNet-18
(``num_classes=10``, 11.2M numbers, one stream and one W-shaped output per weight, as a backward
redraws them) over the time of one SGD-momentum training step (batch 32, 32x32 inputs), measured
in interleaved rounds in the same process (medians), so that load from other processes hits both.

    python benchmarks/generator_throughput.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from pfa_fx import counter_rng as cr


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--numbers", type=int, default=1 << 22, help="numbers per throughput draw (default 4M)")
    parser.add_argument("--eager-numbers", type=int, default=1 << 20, help="numbers per eager draw (default 1M)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--steps", type=int, default=6, help="interleaved ResNet-18 step/draw rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    ok, reason = cr.compiled_available("cpu")
    probe_s = time.perf_counter() - t
    t = time.perf_counter()
    cr.gaussian(0, 0, 0, 4 * cr.TILE, dtype=torch.float32)  # the float32 kernel
    compile32_s = time.perf_counter() - t

    n, ne = args.numbers, args.eager_numbers
    out32 = torch.empty(n)
    out64 = torch.empty(n, dtype=torch.float64)
    eag32 = torch.empty(ne)
    gen = torch.Generator().manual_seed(0)
    rows = [
        ("counter_rng eager, float32", ne, lambda: cr.fill_gaussian(eag32, 1, 2, 0, compiled=False)),
        ("torch.randn (CPU MT), float32", n, lambda: torch.randn(n, generator=gen, out=out32)),
        ("torch.randn (CPU MT), float64", n, lambda: torch.randn(n, generator=gen, dtype=torch.float64, out=out64)),
    ]
    if ok:
        rows[1:1] = [
            ("counter_rng compiled, float32", n, lambda: cr.fill_gaussian(out32, 1, 2, 0)),
            ("counter_rng compiled, float64", n, lambda: cr.fill_gaussian(out64, 1, 2, 0)),
        ]
    print(f"threads={args.threads}, compiled kernel: {'yes' if ok else 'no: ' + str(reason)}")
    print(f"first compile: probe (float64 kernel) {probe_s:.1f} s, float32 kernel {compile32_s:.1f} s\n")
    print("| generator | numbers/s | ns/number |\n|---|---:|---:|")
    for name, count, fn in rows:
        s = _time(fn, args.repeats)
        print(f"| {name} | {count / s / 1e6:.1f} M | {s / count * 1e9:.2f} |")

    model = torchvision.models.resnet18(num_classes=10)
    weights = [p for p in model.parameters() if p.dim() > 1]
    total = sum(w.numel() for w in weights)
    outs = [torch.empty_like(w) for w in weights]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def draw(compiled):
        for i, o in enumerate(outs):
            cr.fill_gaussian(o, 1234, i, 0, compiled=compiled)

    def randn64():
        for o in outs:
            o.copy_(torch.randn(o.shape, generator=gen, dtype=torch.float64))

    variants = {"step": step, "randn float64 (today's redraw)": randn64}
    if ok:
        variants["counter_rng compiled"] = lambda: draw(None)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(args.steps):
        for k, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nResNet-18 (num_classes=10): {len(weights)} weights, {total / 1e6:.2f} M numbers, float32 outputs")
    print("| | median s | × step |\n|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.4f} | {v / med['step']:.3f} |")


if __name__ == "__main__":
    main()
