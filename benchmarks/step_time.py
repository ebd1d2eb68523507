"""Train-step time and memory of each rule as ratios to native backprop, same process.

Every variant (native BP, BP plus one more W-sized parameter per weight op, and each
rule) gets its own model copy and SGD-momentum optimizer; steps are interleaved round
robin so drift on a shared machine hits all variants alike; the table reports medians
and ratios to native BP, which are what carries over between machines.

Memory: bytes saved for backward (activations) measured with saved-tensor hooks, and
parameter + optimizer-state bytes; on CUDA also the peak allocated during a step.

Compiled steps: ``--compile`` runs every variant through ``torch.compile`` (the model's
forward and backward; loss and optimizer step stay eager), in each ``--compile-mode``
given (``default``, ``reduce-overhead``: CUDA graphs on CUDA, the default mode's code on
the CPU; ``max-autotune-no-cudagraphs``). ``--compare-compiled`` adds eager mode: every
variant is then measured eager and in each compile mode in the same interleaved rounds,
each with its own model copy and optimizer. ``× BP`` is always the ratio to BP *of the same
mode* (eager rule / eager BP, compiled rule / compiled BP of that compile mode) and
``× eager`` a compiled step over the same variant's eager step.

Per-op overhead: ``Δ/op µs`` is ``(variant step − BP step of the same mode) / weight ops``
(the Linear/Conv modules of the model): what a rule adds per converted op, whatever it is
spent on (Python in eager mode, extra kernels in a compiled graph).

Launch- or overhead-bound steps: ratios to BP mean little where BP's step is dominated by
fixed per-op costs rather than by the arithmetic, so each mode's BP gets a check, printed
under the table:

* CUDA: the host time of a step (``perf_counter`` from the step's start until the Python
  call returns, before the synchronize) against its wall time (after the synchronize).
  When the host is busy for ``>= LAUNCH_BOUND`` (90 %) of the wall time, the GPU ran out
  of queued work while the host was still launching: the step is **launch-bound**. The
  process CPU time of a step (all threads, autograd's device thread included) is printed
  next to it; above the wall time it means more than one thread was busy launching.
* CPU (no asynchronous queue): the same BP step at ``--floor-batch`` samples (default 2;
  0 switches the check off) measures the per-step cost that does not scale with the batch
  (Python, dispatch, per-op setup). When it is ``>= OVERHEAD_BOUND`` (30 %) of the full
  step, the step is **overhead-bound**: per-op costs, not arithmetic, set the ratios. The
  floor steps run after the timed rounds (a compiled model recompiles once for them).

    python benchmarks/step_time.py --models resnet18 --size 32 --batch 128          # CPU
    python benchmarks/step_time.py --device cuda --size 224 --batch 128 --amp bf16  # GPU
    python benchmarks/step_time.py --models resnet18 --variants bp fa kp pfa-compact \
        --compare-compiled --threads 2 --warmup 2 --repeats 8                       # eager | compiled
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import pfa_fx

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _shared import CLASSIFIERS, WEIGHT_MODULES, command_line, cpu_name, emit
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._shared import CLASSIFIERS, WEIGHT_MODULES, command_line, cpu_name, emit

MODELS = CLASSIFIERS  # name -> untrained model, 100 classes

# name -> (rule, options); None is native BP
VARIANTS: dict[str, tuple[str, dict] | None] = {
    "bp": None,
    "bp+state": None,  # BP plus one W-sized parameter per weight op, stepped by SGD: KP's floor
    "bp+state10": None,  # BP plus 10 W-sized parameters per weight op: explicit R's floor at expansion 10
    "fa": ("fa", {}),
    "dfa": ("dfa", {}),
    "sf": ("sf", {}),
    "sf-frsf": ("sf", {"variant": "frsf"}),
    "sf-brsf": ("sf", {"variant": "brsf"}),
    "kp": ("kp", {}),
    "kp-implicit": ("kp", {"implicit": True}),  # W_b = W + α·D0: no W-sized optimizer state (SGD only)
    "wm": ("wm", {}),  # one mirror step per op after each optimizer step
    "pal": ("pal", {}),  # a second, noisy forward without grad per step
    "pfa-compact": ("pfa", {"expansion": 10, "compact": True}),
    "pfa-compact-implicit": ("pfa", {"expansion": 10, "compact": True, "implicit": True}),  # SGD only
    "pfa": ("pfa", {"expansion": 10}),
    "pfa-product": ("pfa", {"expansion": 10, "route": "product"}),
    "pfa-x1": ("pfa", {"expansion": 1}),
    "pfa-population": ("pfa", {"expansion": 10, "route": "population"}),
    # the module-preserving front end (FSDP2): each weight op in its owner's forward
    "bp-modules": ("bp", {"capture": "modules"}),
    "fa-modules": ("fa", {"capture": "modules"}),
    "pfa-compact-modules": ("pfa", {"expansion": 10, "compact": True, "capture": "modules"}),
}

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
LAUNCH_BOUND = 0.9  # CUDA: host busy for this fraction of a BP step's wall time
OVERHEAD_BOUND = 0.3  # CPU: a BP step at --floor-batch takes this fraction of the full step


def weight_ops(model: nn.Module) -> int:
    """Linear/Conv modules: the ops a conversion turns into feedback ops."""
    return sum(isinstance(m, WEIGHT_MODULES) for m in model.modules())


def compile_model(model: nn.Module, mode: str) -> Any:
    # dynamic=False: the --floor-batch steps get a graph of their own, not a dynamic one
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


class Variant:
    def __init__(self, name: str, base: nn.Module, args: argparse.Namespace, mode: str = "eager"):
        self.name = name
        self.mode = mode  # "eager" or a torch.compile mode
        self.compiled = mode != "eager"
        spec = VARIANTS[name]
        model = copy.deepcopy(base) if spec is None else pfa_fx.convert(base, spec[0], seed=0, **spec[1])
        model = model.to(args.device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = compile_model(model, mode) if self.compiled else model
        self.shadow: list[tuple[nn.Parameter, nn.Parameter]] = []
        params = list(model.parameters())
        if name.startswith("bp+state"):
            copies = 10 if name == "bp+state10" else 1
            for m in model.modules():
                if isinstance(m, WEIGHT_MODULES):
                    extra = nn.Parameter(torch.zeros(copies, *m.weight.shape, device=m.weight.device))
                    self.shadow.append((m.weight, extra))
                    params.append(extra)
        self.opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
        self.times: list[float] = []
        self.host: list[float] = []  # until the step's Python returns (CUDA: before the synchronize)
        self.cpu: list[float] = []  # process CPU time, all threads
        self.peak = float("nan")
        self.saved = float("nan")
        self.state_bytes = float("nan")

    def step(self, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> None:
        if self.mode == "reduce-overhead":
            # several CUDA-graphed models take turns: each step starts a new generation
            torch.compiler.cudagraph_mark_step_begin()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        for w, extra in self.shadow:
            # its own gradient tensor, as a real parameter has (KP's B.grad is a copy too)
            extra.grad = w.grad.unsqueeze(0).expand_as(extra).clone()
        self.opt.step()

    def timed_step(self, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None, sync: Callable) -> float:
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        self.step(x, y, amp)
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        self.host.append(t1 - t0)
        self.cpu.append(time.process_time() - c0)
        return t2 - t0

    def measure_memory(self, x, y, amp) -> None:
        saved: dict[int, int] = {}
        # parameters and buffers saved for backward cost no memory of their own
        held = {t.untyped_storage().data_ptr() for t in [*self.model.parameters(), *self.model.buffers()]}

        def pack(t: torch.Tensor):
            try:
                st = t.untyped_storage()
                if st.data_ptr() not in held:
                    saved[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
            return t

        if not self.compiled:
            # a compiled model would run (or recompile) under the hooks: its saved tensors
            # are those of its AOT backward graph, not counted here
            hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            with hooks, torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(self.model(x), y)
            self.saved = sum(saved.values())
            loss.backward()
            self.opt.zero_grad(set_to_none=True)
        state = sum(p.numel() * p.element_size() for g in self.opt.param_groups for p in g["params"])
        state += sum(
            t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)
        )
        state += sum(b.numel() * b.element_size() for b in self.model.buffers())
        self.state_bytes = state
        if x.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.step(x, y, amp)
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - base


def bench_model(name: str, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    torch.manual_seed(0)
    base = MODELS[name]()
    ops = weight_ops(base)
    modes = (["eager"] if args.compare_compiled or not args.compile else []) + (
        args.compile_mode if args.compile or args.compare_compiled else []
    )
    variants = [Variant(v, base, args, mode) for v in args.variants for mode in modes]
    dev = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (args.batch,), device=dev)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for v in variants:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            v.step(x, y, amp)
        sync()
        if v.compiled:
            print(
                f"{name} {v.name} ({v.mode}): compiled and warmed up in {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
            )
        v.measure_memory(x, y, amp)  # after the warmup: the CUDA peak of a step, not of compiling
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate order: no variant always first
        for v in order:
            v.times.append(v.timed_step(x, y, amp, sync))
    bps = {v.mode: v for v in variants if v.name == "bp"}
    eager = {v.name: v for v in variants if not v.compiled}
    rows = []
    for v in variants:
        bp, t = bps[v.mode], statistics.median(v.times)
        t_bp = statistics.median(bp.times)
        t_eager = statistics.median(eager[v.name].times) if v.compiled and v.name in eager else float("nan")
        rows.append(
            {
                "model": name,
                "variant": v.name,
                "mode": v.mode,
                "ms": 1e3 * t,
                "ratio": t / t_bp,
                "vs_eager": t / t_eager,
                "us_per_op": 1e6 * (t - t_bp) / ops,
                "saved_ratio": v.saved / bp.saved,
                "state_mb": v.state_bytes / 2**20,
                "peak_ratio": v.peak / bp.peak if dev.type == "cuda" else float("nan"),
            }
        )
    notes = [bound_note(name, bp, ops, x, y, amp, sync, args) for bp in bps.values()]
    return rows, notes


def bound_note(name: str, bp: Variant, ops: int, x, y, amp, sync, args: argparse.Namespace) -> str:
    """The launch-/overhead-bound check of one mode's BP (module docstring)."""
    wall, host, cpu = (statistics.median(t) for t in (bp.times, bp.host, bp.cpu))
    head = f"{name}, BP {bp.mode}: step {1e3 * wall:.1f} ms, {ops} weight ops"
    if x.device.type == "cuda":
        frac = host / wall
        flag = "**launch-bound**" if frac >= LAUNCH_BOUND else "not launch-bound"
        return (
            f"{head}; host {1e3 * host:.1f} ms = {frac:.0%} of wall, process CPU {1e3 * cpu:.1f} ms "
            f"({cpu / wall:.2f}× wall): {flag} (threshold {LAUNCH_BOUND:.0%})"
        )
    if not args.floor_batch:
        return f"{head}; process CPU {1e3 * cpu:.1f} ms ({cpu / wall:.2f}× wall); no floor check (--floor-batch 0)"
    xs, ys = x[: args.floor_batch].clone(), y[: args.floor_batch].clone()
    for _ in range(args.warmup):
        bp.step(xs, ys, amp)
    floor = statistics.median(bp.timed_step(xs, ys, amp, sync) for _ in range(max(3, args.repeats)))
    frac = floor / wall
    flag = "**overhead-bound**" if frac >= OVERHEAD_BOUND else "not overhead-bound"
    return (
        f"{head}; at batch {args.floor_batch} {1e3 * floor:.1f} ms = {frac:.0%} of the step "
        f"({1e6 * floor / ops:.0f} µs per weight op): {flag} (threshold {OVERHEAD_BOUND:.0%})"
    )


def machine(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = cpu_name()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _fmt(v: float) -> str:
    return "" if v != v else f"{v:.3f}"  # blank for NaN (no CUDA peak on CPU)


def table(rows: list[dict], notes: list[str], args: argparse.Namespace) -> str:
    amp = "" if args.amp == "none" else f", autocast {args.amp}"
    if args.compare_compiled:
        comp = f", eager and torch.compile (mode {' / '.join(args.compile_mode)}) side by side"
    elif args.compile:
        comp = f", torch.compile (mode {' / '.join(args.compile_mode)})"
    else:
        comp = ""
    head = (
        f"{machine(args)}, {date.today()}, batch {args.batch}, {args.size} px{amp}"
        f"{', channels_last' if args.channels_last else ''}{comp}, "
        f"median of {args.repeats} interleaved steps\n\n"
        f"`{command_line()}`\n\n"
        "| model | variant | mode | step ms | × BP (same mode) | × eager | Δ/op µs | saved activations × BP "
        "| params+opt state MB | peak mem × BP |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['model']} | {r['variant']} | {r['mode']} | {r['ms']:.1f} | {r['ratio']:.3f} | {_fmt(r['vs_eager'])} | "
        f"{r['us_per_op']:.0f} | {_fmt(r['saved_ratio'])} | {r['state_mb']:.1f} | {_fmt(r['peak_ratio'])} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18"], choices=list(MODELS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant")
    p.add_argument(
        "--compile-mode",
        nargs="+",
        default=["default"],
        choices=COMPILE_MODES,
        help="torch.compile mode(s); several: each variant compiled in each",
    )
    p.add_argument(
        "--compare-compiled",
        action="store_true",
        help="measure every variant eager and compiled in the same rounds (ratios to BP of the same mode)",
    )
    p.add_argument(
        "--floor-batch",
        type=int,
        default=None,
        help="CPU: batch of the overhead-bound check's BP steps (default 2; 0: no check)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", help="append the markdown table to this file")
    args = p.parse_args(argv)
    if "bp" not in args.variants:
        args.variants = ["bp", *args.variants]
    if args.floor_batch is None:
        args.floor_batch = 2 if args.device == "cpu" else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    notes: list[str] = []
    for m in args.models:
        r, n = bench_model(m, args)
        rows += r
        notes += n
    text = table(rows, notes, args)
    return emit(text, args.out)


if __name__ == "__main__":
    main()
