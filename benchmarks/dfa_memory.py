"""Peak memory and step time of DFA on a large model, against native BP: one process per rule.

DFA's dense per-position projection of the output error is ``d_out·C·H·W`` numbers per op
(about 10¹⁰ in all for ResNet-50 at 224 px with 1,000 classes). pfa_fx caches only the
small ones and redraws the rest in every backward, a block of columns at a time; this
script checks that the peak resident memory stays at BP's level.

    python benchmarks/dfa_memory.py --model resnet50 --size 224 --batch 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(rule: str, model: str, size: int, batch: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    import torchvision

    import pfa_fx

    torch.manual_seed(0)
    net = torchvision.models.get_model(model, num_classes=1000)
    if rule != "native":
        net = pfa_fx.convert(net, rule)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    cached = sum(
        t.numel() * t.element_size()
        for _, node in pfa_fx.feedback_modules(net)
        for t in getattr(node, "_cache", {}).values()
    )
    return {
        "rule": rule,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": min(times),
        "cached_projection_mb": cached / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rules", nargs="+", default=["native", "bp", "dfa"])
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        print(json.dumps(one(args._one, args.model, args.size, args.batch, args.steps)))
        return
    rows = []
    for rule in args.rules:  # a fresh process each: ru_maxrss is a per-process peak
        cmd = [sys.executable, __file__, "--_one", rule, "--model", args.model, "--size", str(args.size)]
        cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{args.model}, {args.size} px, batch {args.batch}, 1,000 classes; fastest of {args.steps} steps\n")
    print("| rule | peak RSS MB | × native | step s | × native | cached projections MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['rule']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | "
            f"{r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f} | {r['cached_projection_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
