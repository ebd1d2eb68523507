"""What ``store_feedback=False`` costs and saves: step time and per-step peak memory.

**Step time.** For each rule that redraws fixed random feedback (fa, sf-frsf, pfa, pfa-o,
dfa), its stored and unstored conversions and native BP, each with its own model copy and
SGD-momentum optimizer, take steps round robin (the order alternates every round) in one
process, so drift on a shared machine hits all variants alike. The table gives medians, the
unstored/stored ratio and both ratios to BP measured in the same rounds. ``--clock process``
times each step by the process's CPU time instead of the wall clock: on a CPU shared with
other jobs, run with ``--threads 1`` it counts the step's own work, not the time slices the
other jobs took (the wall clock then varies several-fold between rounds).

**Peak memory.** ResNet-50 and ViT-B/16 (torchvision, random init, 1,000 classes, batch 2 at
224 px): native BP, FA stored and FA unstored, one SGD-momentum step each (measured after a
first step has created the momentum buffers). The peak is the tensor memory of the step:
the bytes of every tensor alive when it starts (parameters, buffers, optimizer state, the
batch; gradients were set to None) plus the highest point of the running sum of the
allocations and frees the CPU allocator reports during the step (``torch.profiler`` with
``profile_memory=True``, read from the raw memory events in order: every allocation and
free of a CPU tensor, with its size). That is the CPU counterpart of CUDA's
``max_memory_allocated``, which is used on a CUDA device. Resident set size would mix in
the allocator's caching, library and interpreter memory (``benchmarks/dfa_memory.py`` uses
it for a per-process view); it is not what the feedback's storage changes. Target:
FA unstored ≤ 1.02 × BP.

    python benchmarks/feedback_storage.py                       # both parts, CPU
    python benchmarks/feedback_storage.py --part time --models resnet18 --size 32 --batch 32
    python benchmarks/feedback_storage.py --part memory --device cuda
    python benchmarks/feedback_storage.py --part time --rules fa --generator philox   # counter-based draws
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Callable
from datetime import date

import torch
import torch.nn.functional as F
from torch import nn

import pfa_fx

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _shared import CLASSIFIERS, command_line, cpu_name, emit, git_revision, md_table, tv_model
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._shared import CLASSIFIERS, command_line, cpu_name, emit, git_revision, md_table, tv_model

#: rule variant -> (rule, options) of the timed conversions, each stored and unstored
TIMED: dict[str, tuple[str, dict]] = {
    "fa": ("fa", {}),
    "sf-frsf": ("sf", {"variant": "frsf"}),
    "pfa": ("pfa", {"expansion": 10}),
    "pfa-o": ("pfa-o", {"expansion": 10}),
    "dfa": ("dfa", {}),
}
#: the memory part's models: 1,000 classes, as published
MEMORY_MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet50": lambda: tv_model("resnet50", num_classes=1000),
    "vit_b_16": lambda: tv_model("vit_b_16", num_classes=1000),
}


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


#: convert's generator= for every conversion (set from --generator)
GENERATOR = "mt19937"


def _convert(base: nn.Module, rule: str | None, opts: dict, store: bool) -> nn.Module:
    if rule is None:
        return copy.deepcopy(base)
    return pfa_fx.convert(base, rule, seed=0, store_feedback=store, generator=GENERATOR, **opts)


# ------------------------------------------------------------------------------- time
def time_table(args: argparse.Namespace) -> str:
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    notes = []
    for name in args.models:
        torch.manual_seed(0)
        base = CLASSIFIERS[name]()
        variants: dict[tuple[str, bool], tuple[nn.Module, torch.optim.Optimizer]] = {}
        for rule in ["bp", *args.rules]:
            spec = (None, {}) if rule == "bp" else TIMED[rule]
            for store in (True,) if rule == "bp" else (True, False):
                model = _convert(base, spec[0], spec[1], store).to(dev)
                variants[rule, store] = (model, _optimizer(model))
        x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
        y = torch.randint(0, 100, (args.batch,), device=dev)
        times: dict[tuple[str, bool], list[float]] = {k: [] for k in variants}
        for model, opt in variants.values():
            for _ in range(args.warmup):
                _step(model, opt, x, y)
        keys = list(variants)
        for r in range(args.repeats):
            for key in keys if r % 2 == 0 else keys[::-1]:
                model, opt = variants[key]
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                _step(model, opt, x, y)
                sync()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                times[key].append(cpu if args.clock == "process" else wall)
        med = {k: statistics.median(v) for k, v in times.items()}
        bp = med["bp", True]
        spread = min(times["bp", True]), max(times["bp", True])
        notes.append(
            f"{name}: BP step {1e3 * bp:.1f} ms (fastest {1e3 * spread[0]:.1f}, slowest {1e3 * spread[1]:.1f})"
        )
        for rule in args.rules:
            held = _held_mb(variants[rule, True][0]), _held_mb(variants[rule, False][0])
            s, u = med[rule, True], med[rule, False]
            cells = [f"{1e3 * s:.1f}", f"{1e3 * u:.1f}", f"{u / s:.3f}", f"{s / bp:.3f}", f"{u / bp:.3f}"]
            rows.append([name, rule, *cells, f"{held[0]:.1f}", f"{held[1]:.1f}"])
    head = (
        f"{_machine(args)}, {date.today()}, pfa_fx {git_revision()}, batch {args.batch}, {args.size} px, "
        f"median of {args.repeats} interleaved steps (SGD momentum), "
        f"{'process CPU time' if args.clock == 'process' else 'wall clock'}\n\n`{command_line()}`\n\n"
    )
    header = [
        "model",
        "rule",
        "stored ms",
        "unstored ms",
        "unstored / stored",
        "stored × BP",
        "unstored × BP",
        "feedback MB stored",
        "feedback MB unstored",
    ]
    table = md_table(header, rows, "llrrrrrrr")
    return head + "\n".join(table) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _held_mb(model: nn.Module) -> float:
    """Feedback state held (parameters, buffers, DFA's cached projections), MiB."""
    total = 0
    for _, node in pfa_fx.feedback_modules(model):
        tensors = [*node.parameters(), *node.buffers(), *getattr(node, "_cache", {}).values()]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total / 2**20


# ----------------------------------------------------------------------------- memory
def _live_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def step_peak_bytes(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak tensor memory of one training step (module docstring): what is alive at its
    start plus the highest point the step's allocations reach above that."""
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _step(model, opt, x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    live = _live_bytes([*model.parameters(), *model.buffers(), *state, x, y])
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, opt, x, y)
    # the raw records: profiler.events() folds allocations made inside an op into that op
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"
    ]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return live + peak


def memory_table(args: argparse.Namespace) -> str:
    dev = torch.device(args.device)
    rows = []
    for name in args.memory_models:
        torch.manual_seed(0)
        base = MEMORY_MODELS[name]()
        x = torch.randn(2, 3, 224, 224, device=dev)
        y = torch.randint(0, 1000, (2,), device=dev)
        peaks: dict[str, float] = {}
        for label, rule, store in (("bp", None, True), ("fa stored", "fa", True), ("fa unstored", "fa", False)):
            model = _convert(base, rule, {}, store).to(dev)
            opt = _optimizer(model)
            _step(model, opt, x, y)  # creates the momentum buffers: the measured step is a steady one
            peaks[label] = step_peak_bytes(model, opt, x, y) / 2**20
            held = _held_mb(model)
            rows.append([name, label, f"{peaks[label]:.1f}", f"{peaks[label] / peaks['bp']:.3f}", f"{held:.1f}"])
            del model, opt
            gc.collect()
    how = "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "live tensors + torch.profiler memory events"
    head = (
        f"{_machine(args)}, {date.today()}, pfa_fx {git_revision()}, batch 2, 224 px, 1,000 classes, "
        f"one SGD-momentum step after a first one; peak = {how}\n\n`{command_line()}`\n\n"
    )
    table = md_table(["model", "variant", "step peak MiB", "× BP", "feedback state MiB"], rows, "llrrr")
    return head + "\n".join(table) + "\n"


def _machine(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {cpu_name()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["time", "memory", "both"], default="both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["resnet18"], choices=list(CLASSIFIERS), help="timed models")
    p.add_argument("--rules", nargs="+", default=list(TIMED), choices=list(TIMED))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-models", nargs="+", default=list(MEMORY_MODELS), choices=list(MEMORY_MODELS))
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="time steps by the wall clock or by process CPU time",
    )
    p.add_argument("--generator", choices=["mt19937", "philox"], default="mt19937", help="how fixed feedback is drawn")
    p.add_argument("--out", help="append the markdown tables to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global GENERATOR
    GENERATOR = args.generator
    parts = []
    if args.part in ("time", "both"):
        parts.append(time_table(args))
    if args.part in ("memory", "both"):
        parts.append(memory_table(args))
    return emit("\n".join(parts), args.out)


if __name__ == "__main__":
    main()
