"""Eager Python overhead per feedback op, where it can be measured without a GPU.

A launch-bound configuration on the CPU: timm's tiny test models (``test_vit``,
``test_convnext``, ``test_resnet``) at their default input size, batch 2, one thread, so
that a step costs little arithmetic and the Python work of each op shows. Every variant
(native BP and each rule) gets its own model copy and SGD-momentum optimizer; steps run
round robin, the order alternating per round, so drift on a shared machine hits all alike.

Reported per model and rule: median step time, its ratio to native BP, and the eager
overhead per weight op, ``(median rule step − median BP step) / ops`` with
``ops = len(list(pfa_fx.feedback_modules(converted)))``. Steps are timed in CPU
time of the stepping thread (``time.thread_time``; ``--clock wall`` for wall time): with one
torch thread every kernel and the autograd engine run on it, and the time a busy machine's
scheduler hands to other processes is left out.

``--floors`` adds two reference variants of the same converted graph: its weight ops as the
native functions (what the converted graph itself costs), and as a bare ``forward(ctx, ...)``
autograd.Function that does BP's backward and nothing else (the least any per-op Function
costs); the rule's own Python work is what lies above the second.

``--ref REV`` also runs every rule with ``pfa_fx/ops.py`` as it was at git revision ``REV``
(or from a file), loaded next to the current one, in the same process and the same
interleaved rounds: a before/after comparison in one run. The rest of ``pfa_fx`` (rules,
convert) is the current one, so the old ops.py must work with today's rules.

On a shared machine single entries move by about ±10 µs per op between runs; compare
variants of one run, and use more ``--repeats`` for small differences.

    python benchmarks/op_overhead.py                     # bp fa sf kp pfa-compact
    python benchmarks/op_overhead.py --floors --ref HEAD --repeats 100
    python benchmarks/op_overhead.py --rules wm pal pfa --models test_vit
    python benchmarks/op_overhead.py --ref /tmp/old_ops.py   # a file works as --ref too

(``dfa`` runs too, but its output-error projections cost about a second per step here.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import statistics
import subprocess
import sys
import time
import types
from datetime import date
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import pfa_fx
from pfa_fx import ops

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _shared import RULES, command_line, emit, threads_line
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._shared import RULES, command_line, emit, threads_line

MODELS = ("test_vit", "test_convnext", "test_resnet")

_OP_NAMES = ("feedback_linear", "feedback_conv", "feedback_conv_transpose", "feedback_expert_mix")
ROOT = Path(__file__).resolve().parent.parent


def ops_at(rev: str) -> types.ModuleType:
    """``pfa_fx/ops.py`` at git revision ``rev`` (or the file at path ``rev``), as a module
    of the current package."""
    if Path(rev).is_file():
        src = Path(rev).read_text()
    else:
        src = subprocess.run(
            ["git", "show", f"{rev}:pfa_fx/ops.py"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
    name = f"pfa_fx._ops_at_{len(sys.modules)}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "pfa_fx"
    sys.modules[name] = mod
    exec(compile(src, f"{rev}:pfa_fx/ops.py", "exec"), mod.__dict__)
    return mod


@contextlib.contextmanager
def ops_from(module: types.ModuleType | None):
    """Convert with ``module``'s op functions (the converted graph binds them for good)."""
    if module is None:
        yield
        return
    saved = {n: getattr(ops, n) for n in _OP_NAMES}
    try:
        for n in _OP_NAMES:
            setattr(ops, n, getattr(module, n))
        yield
    finally:
        for n, f in saved.items():
            setattr(ops, n, f)


# --- floors: the converted graph with its weight ops as native functions / as a bare Function
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default


class _BareConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, args):
        ctx.save_for_backward(x, weight)
        ctx.args, ctx.bias_sizes = args, None if bias is None else [bias.shape[0]]
        return torch.conv2d(x, weight, bias, *args)

    @staticmethod
    def backward(ctx, e):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        nx, nw, nb, _ = ctx.needs_input_grad
        out_pad = [0] * len(stride)
        mask = [nx, nw, nb]
        grads = _CONV_BACKWARD(e, x, weight, ctx.bias_sizes, stride, padding, dilation, False, out_pad, groups, mask)
        return *grads, None


class _BareLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        out = torch._C._nn.linear(x, weight, bias)
        return out.detach() if out.dim() > 2 else out

    @staticmethod
    def backward(ctx, e):
        x, weight = ctx.saved_tensors
        e2 = e.reshape(-1, e.shape[-1])
        gb = e2.sum(0) if ctx.needs_input_grad[2] else None
        return e.matmul(weight), e2.t().mm(x.reshape(-1, x.shape[-1])), gb


def _floor_ops(bare: bool) -> types.ModuleType:
    """Stand-ins for the feedback ops of 2-D convolutions and linears (other ops keep theirs)."""
    mod = types.ModuleType("floor")
    for n in _OP_NAMES:
        setattr(mod, n, getattr(ops, n))

    def conv(x, weight, bias, node, stride=1, padding=0, dilation=1, groups=1):
        if not bare or weight.dim() != 4 or isinstance(padding, str):
            return torch.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return _BareConv.apply(x, weight, bias, (list(stride), list(padding), list(dilation), groups))

    def linear(x, weight, bias, node):
        return _BareLinear.apply(x, weight, bias) if bare else torch._C._nn.linear(x, weight, bias)

    mod.feedback_conv, mod.feedback_linear = conv, linear
    return mod


class Variant:
    def __init__(self, label: str, base: nn.Module, rule: pfa_fx.RuleConfig | str | None, opts: dict, ops_module=None):
        self.label = label
        if rule is None:
            self.model = copy.deepcopy(base)
            self.ops = 0
        else:
            with ops_from(ops_module):
                self.model = pfa_fx.convert(base, rule, seed=0, **opts)
            self.ops = len(list(pfa_fx.feedback_modules(self.model)))
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()


def bench_model(name: str, args: argparse.Namespace, ref_ops) -> list[dict]:
    torch.manual_seed(0)
    base = timm.create_model(name)
    size = base.pretrained_cfg["input_size"] if args.size is None else (3, args.size, args.size)
    variants = [Variant("native BP", base, None, {})]
    if args.floors:
        variants.append(Variant("floor: graph, native ops", base, "bp", {}, _floor_ops(bare=False)))
        variants.append(Variant("floor: graph, bare Function", base, "bp", {}, _floor_ops(bare=True)))
    for r in args.rules:
        variants.append(Variant(r, base, RULES[r], {}))
        if ref_ops is not None:
            variants.append(Variant(f"{r} @{args.ref}", base, RULES[r], {}, ref_ops))
    x = torch.randn(args.batch, *size)
    y = torch.randint(0, base.num_classes, (args.batch,))
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    for v in variants:
        for _ in range(args.warmup):
            v.step(x, y)
    for r in range(args.repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            t0 = clock()
            v.step(x, y)
            v.times.append(clock() - t0)
    bp = variants[0]
    t_bp = statistics.median(bp.times)
    rows = []
    for v in variants:
        t = statistics.median(v.times)
        per_op = 1e6 * (t - t_bp) / v.ops if v.ops else float("nan")
        rows.append({"model": name, "variant": v.label, "ops": v.ops, "ms": 1e3 * t, "ratio": t / t_bp, "us": per_op})
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"{threads_line()}, {date.today()}, batch {args.batch}, "
        f"{'default input size' if args.size is None else f'{args.size} px'}, SGD momentum, "
        f"median of {args.repeats} interleaved steps, {args.clock} clock\n\n"
        f"`{command_line()}`\n\n"
        "| model | variant | weight ops | step ms | × BP | (rule − BP) µs per op |\n"
        "|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['model']} | {r['variant']} | {r['ops'] or ''} | {r['ms']:.2f} | {r['ratio']:.3f} | "
        + ("" if r["us"] != r["us"] else f"{r['us']:+.0f}")
        + " |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--rules", nargs="+", default=["bp", "fa", "sf", "kp", "pfa-compact"], choices=list(RULES))
    p.add_argument("--ref", help="also run each rule with pfa_fx/ops.py from this git revision (or file)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=None, help="input size in px (default: the model's own)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="thread", choices=["thread", "wall"], help="CPU time of the thread, or wall time")
    p.add_argument("--floors", action="store_true", help="add the graph-only and bare-Function reference variants")
    p.add_argument("--out", help="append the markdown table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref_ops = ops_at(args.ref) if args.ref else None
    rows = [r for m in args.models for r in bench_model(m, args, ref_ops)]
    text = table(rows, args)
    return emit(text, args.out)


if __name__ == "__main__":
    main()
