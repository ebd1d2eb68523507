"""Train-step time and memory of each rule as ratios to native backprop, same process.

Every variant (native BP, BP plus one more W-sized parameter per weight op, and each
rule) gets its own model copy and SGD-momentum optimizer; steps are interleaved round
robin so drift on a shared machine hits all variants alike; the table reports medians
and ratios to native BP, which are what carries over between machines.

Memory: bytes saved for backward (activations) measured with saved-tensor hooks, and
parameter + optimizer-state bytes; on CUDA also the peak allocated during a step.

    python benchmarks/step_time.py --models resnet18 --size 32 --batch 128          # CPU
    python benchmarks/step_time.py --device cuda --size 224 --batch 128 --amp bf16  # GPU
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pfa_fx
from pfa_fx.convert import WEIGHT_MODULES

MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=100),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=100),
    "vit_small": lambda: timm.create_model("vit_small_patch16_224", num_classes=100, dynamic_img_size=True),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=100),
}

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
    "wm": ("wm", {}),  # one mirror step per op after each optimizer step
    "pal": ("pal", {}),  # a second, noisy forward without grad per step
    "pfa-compact": ("pfa", {"expansion": 10, "compact": True}),
    "pfa": ("pfa", {"expansion": 10}),
    "pfa-product": ("pfa", {"expansion": 10, "route": "product"}),
    "pfa-x1": ("pfa", {"expansion": 1}),
    "pfa-population": ("pfa", {"expansion": 10, "route": "population"}),
}


class Variant:
    def __init__(self, name: str, base: nn.Module, args: argparse.Namespace):
        self.name = name
        spec = VARIANTS[name]
        model = copy.deepcopy(base) if spec is None else pfa_fx.convert(base, spec[0], seed=0, **spec[1])
        model = model.to(args.device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if args.compile else model
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
        self.peak = float("nan")
        self.saved = float("nan")
        self.state_bytes = float("nan")

    def step(self, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        for w, extra in self.shadow:
            # its own gradient tensor, as a real parameter has (KP's B.grad is a copy too)
            extra.grad = w.grad.unsqueeze(0).expand_as(extra).clone()
        self.opt.step()

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


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    base = MODELS[name]()
    variants = [Variant(v, base, args) for v in args.variants]
    dev = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (args.batch,), device=dev)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for v in variants:
        v.measure_memory(x, y, amp)
        for _ in range(args.warmup):
            v.step(x, y, amp)
    sync()
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate order: no variant always first
        for v in order:
            sync()
            t0 = time.perf_counter()
            v.step(x, y, amp)
            sync()
            v.times.append(time.perf_counter() - t0)
    bp = next(v for v in variants if v.name == "bp")
    t_bp = statistics.median(bp.times)
    rows = []
    for v in variants:
        t = statistics.median(v.times)
        rows.append(
            {
                "model": name,
                "variant": v.name,
                "ms": 1e3 * t,
                "ratio": t / t_bp,
                "saved_ratio": v.saved / bp.saved,
                "state_mb": v.state_bytes / 2**20,
                "peak_ratio": v.peak / bp.peak if dev.type == "cuda" else float("nan"),
            }
        )
    return rows


def machine(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _fmt(v: float) -> str:
    return "" if v != v else f"{v:.3f}"  # blank for NaN (no CUDA peak on CPU)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    amp = "" if args.amp == "none" else f", autocast {args.amp}"
    head = (
        f"{machine(args)}, {date.today()}, batch {args.batch}, {args.size} px{amp}"
        f"{', channels_last' if args.channels_last else ''}{', torch.compile' if args.compile else ''}, "
        f"median of {args.repeats} interleaved steps\n\n"
        f"`{' '.join(['python', *sys.argv])}`\n\n"
        "| model | variant | step ms | × BP | saved activations × BP | params+opt state MB | peak mem × BP |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['model']} | {r['variant']} | {r['ms']:.1f} | {r['ratio']:.3f} | {r['saved_ratio']:.3f} | "
        f"{r['state_mb']:.1f} | {_fmt(r['peak_ratio'])} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18"], choices=list(MODELS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", help="append the markdown table to this file")
    args = p.parse_args(argv)
    if "bp" not in args.variants:
        args.variants = ["bp", *args.variants]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for m in args.models for r in bench_model(m, args)]
    text = table(rows, args)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return text


if __name__ == "__main__":
    main()
