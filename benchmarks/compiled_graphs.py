"""What ``torch.compile`` makes of a converted model, relative to native backprop.

Two views, per model and variant (native BP and each rule):

1. **Graph breaks.** ``torch._dynamo.explain(model)(x)`` with the ``eager`` backend: how many
   graphs dynamo cuts the forward into, how many breaks that takes, and the distinct break
   reasons (first line, truncated). Native BP is one graph without breaks; every break of a
   rule is Python work that stays outside the compiled graph and splits inductor's fusion.

2. **Graph diff.** The model is compiled with a counting backend that sees what inductor
   would receive: ``aot_autograd`` with inductor's decompositions
   (``select_decomp_table()``) and its min-cut rematerialization partitioner. One train step
   (forward, cross-entropy, backward) fills in the AOT forward and backward graphs; their
   ``call_function`` targets are counted (summed over the graphs, if dynamo broke the model
   into several) and reported as the difference to BP's counts:

   - *forward / backward ops beyond BP*: e.g. ``+21 aten.sign.default, +21 aten.mul.Tensor``
     (an op the rule adds), ``-21 aten.convolution_backward.default`` (one it drops); a
     rule that runs exactly BP's graph shows ``0``.
   - *saved beyond BP*: tensors the forward keeps for the backward (the backward graph's
     placeholders other than ``tangents_*``), split into graph inputs (``primals_*``:
     parameters, buffers, feedback weights, the input; kept at no cost) and activations
     (everything else: memory the rule adds between forward and backward).
   - *forward outputs beyond BP*: all outputs of the forward graph (user outputs, updated
     buffers, saved tensors); the part of the difference not explained by saved tensors is
     state the forward hands out of the graph (side effects such as updated feedback state).

   Where dynamo broke the model into several graphs (``dfa``: its weight ops run in
   ``torch.compiler.disable``d functions), the variant is labelled with its graph count and
   the counts cover only what is inside the graphs: ops run eagerly between them show as
   *missing* (negative) ops, and every graph's own outputs count as forward outputs not
   saved for backward. A rule whose backward cannot be traced ahead of time fails here; the
   row then shows the error's first line.

Models: ``resnet18`` (torchvision, 100 classes, 32 px) and ``vit_small`` (timm
``vit_small_patch16_224``, 100 classes, ``dynamic_img_size=True``, 64 px). Nothing is run
through inductor itself, so the numbers are exact and independent of machine load; the
default run takes about 8 minutes on two cores (most of it ViT-S).

    python benchmarks/compiled_graphs.py                     # both models, fa sf kp pfa-compact dfa wm pal
    python benchmarks/compiled_graphs.py --models resnet18 --rules kp pfa --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import torch
import torch._dynamo
import torch._inductor.lowering  # select_decomp_table consults the lowerings
import torch.nn.functional as F
from torch import fx, nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table

import pfa_fx

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _shared import CLASSIFIERS, RULES, command_line, emit, threads_line
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._shared import CLASSIFIERS, RULES, command_line, emit, threads_line

# name -> (constructor, input size in px)
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (CLASSIFIERS["resnet18"], 32),
    "vit_small": (CLASSIFIERS["vit_small"], 64),
}

DEFAULT_RULES = ["fa", "sf", "kp", "pfa-compact", "dfa", "wm", "pal"]
BP = "native BP"
REASON_CHARS = 100


@dataclass
class Graphs:
    """Op counts and sizes of the AOT forward and backward graphs of one train step."""

    fw: Counter[str]
    bw: Counter[str]
    saved_inputs: int
    saved_activations: int
    fw_outputs: int
    graphs: int


def first_line(err: BaseException | str, limit: int = REASON_CHARS) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    if isinstance(err, BaseException):
        line = f"{type(err).__name__}: {line}"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def build(model_name: str, variant: str, base: nn.Module) -> nn.Module:
    if variant == BP:
        model = copy.deepcopy(base)
    else:
        model = pfa_fx.convert(base, RULES[variant], seed=0)
    return model.train()


def inputs(model_name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = MODELS[model_name][1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 100, (batch,), generator=gen)
    return x, y


def explain(model: nn.Module, x: torch.Tensor) -> tuple[int, int, list[str]]:
    """Graph count, break count and distinct break reasons under dynamo."""
    torch._dynamo.reset()
    e = torch._dynamo.explain(model)(x)
    reasons = sorted({first_line(str(r.reason)) for r in e.break_reasons})
    return e.graph_count, e.graph_break_count, reasons


def _target(node: fx.Node) -> str:
    t = node.target
    return (
        str(t) if isinstance(t, torch._ops.OpOverload | torch._ops.OpOverloadPacket) else getattr(t, "__name__", str(t))
    )


def _counter(store: list[fx.GraphModule]) -> Callable:
    def compiler(gm: fx.GraphModule, example_inputs: list) -> Callable:
        store.append(gm)
        return gm.forward

    return compiler


def aot_graphs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Graphs:
    """Compile ``model`` with a backend that records the AOT graphs inductor would get, run
    one train step, and count what is in them."""
    fws: list[fx.GraphModule] = []
    bws: list[fx.GraphModule] = []
    backend = aot_autograd(
        fw_compiler=_counter(fws),
        bw_compiler=_counter(bws),
        decompositions=select_decomp_table(),
        partition_fn=min_cut_rematerialization_partition,
    )
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    F.cross_entropy(compiled(x), y).backward()
    if not fws or not bws:
        raise RuntimeError(f"no AOT graphs recorded ({len(fws)} forward, {len(bws)} backward)")

    def ops(gms: list[fx.GraphModule]) -> Counter[str]:
        return Counter(_target(n) for gm in gms for n in gm.graph.nodes if n.op == "call_function")

    placeholders = [n.name for gm in bws for n in gm.graph.nodes if n.op == "placeholder"]
    saved_inputs = sum(p.startswith("primals") for p in placeholders)
    saved_activations = sum(not p.startswith(("primals", "tangents")) for p in placeholders)
    fw_outputs = 0
    for gm in fws:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        vals = out.args[0]
        fw_outputs += len(vals) if isinstance(vals, tuple | list) else 1
    return Graphs(ops(fws), ops(bws), saved_inputs, saved_activations, fw_outputs, len(fws))


def op_diff(counts: Counter[str], ref: Counter[str]) -> str:
    diff = {k: counts[k] - ref[k] for k in counts.keys() | ref.keys() if counts[k] != ref[k]}
    if not diff:
        return "0"
    items = sorted(diff.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
    return ", ".join(f"{d:+d} {k}" for k, d in items)


def saved_diff(g: Graphs, ref: Graphs) -> str:
    di, da = g.saved_inputs - ref.saved_inputs, g.saved_activations - ref.saved_activations
    return f"{di:+d} inputs, {da:+d} activations"


def outputs_diff(g: Graphs, ref: Graphs) -> str:
    d = g.fw_outputs - ref.fw_outputs
    saved = (g.saved_inputs + g.saved_activations) - (ref.saved_inputs + ref.saved_activations)
    return f"{d:+d} ({d - saved:+d} not saved for backward)"


def run_model(model_name: str, variants: list[str], batch: int) -> tuple[list[str], list[str]]:
    """Rows of the breaks table and of the graph-diff table for one model."""
    torch.manual_seed(0)
    base = MODELS[model_name][0]()
    x, y = inputs(model_name, batch)
    break_rows: list[str] = []
    diff_rows: list[str] = []
    ref: Graphs | None = None
    for v in variants:
        try:
            model = build(model_name, v, base)
        except Exception as err:
            msg = f"convert failed: {first_line(err)}"
            break_rows.append(f"| {model_name} | {v} | | | {msg} |")
            diff_rows.append(f"| {model_name} | {v} | {msg} | | | |")
            continue
        try:
            graphs, breaks, reasons = explain(model, x)
            break_rows.append(f"| {model_name} | {v} | {graphs} | {breaks} | {'; '.join(reasons)} |")
        except Exception as err:
            break_rows.append(f"| {model_name} | {v} | | | explain failed: {first_line(err)} |")
        print(break_rows[-1], file=sys.stderr, flush=True)
        try:
            g = aot_graphs(build(model_name, v, base), x, y)
        except Exception as err:
            diff_rows.append(f"| {model_name} | {v} | AOT failed: {first_line(err)} | | | |")
            print(diff_rows[-1], file=sys.stderr, flush=True)
            continue
        finally:
            torch._dynamo.reset()
        if v == BP:
            ref = g
            diff_rows.append(
                f"| {model_name} | {v} | {sum(g.fw.values())} ops | {sum(g.bw.values())} ops | "
                f"{g.saved_inputs} inputs, {g.saved_activations} activations | {g.fw_outputs} |"
            )
        elif ref is None:
            diff_rows.append(f"| {model_name} | {v} | (no BP reference) | | | |")
        else:
            graphs_note = f" ({g.graphs} graphs)" if g.graphs != ref.graphs else ""
            diff_rows.append(
                f"| {model_name} | {v}{graphs_note} | {op_diff(g.fw, ref.fw)} | {op_diff(g.bw, ref.bw)} | "
                f"{saved_diff(g, ref)} | {outputs_diff(g, ref)} |"
            )
        print(diff_rows[-1], file=sys.stderr, flush=True)
    return break_rows, diff_rows


def report(break_rows: list[str], diff_rows: list[str], args: argparse.Namespace) -> str:
    sizes = ", ".join(f"{m} {MODELS[m][1]} px" for m in args.models)
    return (
        f"{threads_line()}, {date.today()}, batch {args.batch}, {sizes}\n\n"
        f"`{command_line()}`\n\n"
        "Graph breaks (`torch._dynamo.explain`, eager backend):\n\n"
        "| model | variant | graphs | breaks | reasons |\n"
        "|---|---|---|---|---|\n" + "\n".join(break_rows) + "\n\n"
        "AOT graphs of one train step (inductor decompositions, min-cut partitioner), "
        "difference to native BP (BP's row: its totals):\n\n"
        "| model | variant | forward ops beyond BP | backward ops beyond BP | saved beyond BP | "
        "forward outputs beyond BP |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(diff_rows) + "\n"
    )


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rules", nargs="+", default=DEFAULT_RULES, choices=list(RULES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="append the markdown tables to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    variants = [BP, *[r for r in args.rules if r != BP]]
    break_rows: list[str] = []
    diff_rows: list[str] = []
    for m in args.models:
        b, d = run_model(m, variants, args.batch)
        break_rows += b
        diff_rows += d
    text = report(break_rows, diff_rows, args)
    return emit(text, args.out)


if __name__ == "__main__":
    main()
