"""Train-step time of converted Hugging Face language models against the native model, per
front end: the torch.export graph (``capture="export"``, what ``convert`` picks for these
models) and the eager interception (``capture="eager"``), eagerly and under
``torch.compile``.

Every variant is built from the same initial model and timed in the same process,
interleaved round by round (one step of each per round, the order rotated), so the ratios
to native BP are what this machine's load leaves comparable; absolute times are noise.

Usage::

    python benchmarks/hf_step_time.py                       # gpt2 and llama, 4 layers, width 256
    python benchmarks/hf_step_time.py --compile --rounds 10 # also under torch.compile (inductor)
    python benchmarks/hf_step_time.py --quick               # seconds: what the test runs
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import pfa_fx

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _shared import emit, host_line, md_table, threads_line
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._shared import emit, host_line, md_table, threads_line

#: variant -> (rule, options); None is the native model
VARIANTS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "native": None,
    "bp": ("bp", {}),
    "fa": ("fa", {}),
    "pfa-compact": ("pfa", {"expansion": 10, "compact": True}),
}


def build(name: str, layers: int, width: int, vocab: int, context: int) -> nn.Module:
    """A small decoder from a config (no weights downloaded); dropout off so that every
    variant computes the same numbers."""
    import transformers

    if name == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=layers, n_embd=width, n_head=4, vocab_size=vocab, n_positions=context,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)
    if name == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=layers, hidden_size=width, intermediate_size=4 * width, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=context,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(cfg)
    raise SystemExit(f"unknown model {name!r}; valid: gpt2, llama")


class Variant:
    """One converted (or native) copy with its optimizer and step times."""

    def __init__(self, label: str, model: nn.Module):
        self.label, self.model = label, model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.times: list[float] = []

    def step(self, ids: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def variants(base: nn.Module, compile_: bool) -> list[Variant]:
    """The native model first, then each rule through each front end (and compiled)."""
    out = [Variant("native", copy.deepcopy(base))]
    if compile_:
        out.append(Variant("native, compiled", torch.compile(out[0].model)))
    for name, spec in VARIANTS.items():
        if spec is None:
            continue
        for capture in ("export", "eager"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the eager front end says it has no graph
                model = pfa_fx.convert(base, spec[0], capture=capture, **spec[1])
            out.append(Variant(f"{name} ({capture})", model))
            if compile_ and capture == "export":
                out.append(Variant(f"{name} ({capture}), compiled", torch.compile(model)))
    return out


def bench(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> list[list[str]]:
    torch.manual_seed(0)
    base = build(name, args.layers, args.width, args.vocab, args.context)
    ids = torch.randint(0, args.vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(1))
    runs = variants(base, args.compile)
    for v in runs:  # warm-up (and compilation) outside the timed rounds
        for _ in range(args.warmup):
            v.step(ids)
    for r in range(args.rounds):
        for v in runs[r % len(runs) :] + runs[: r % len(runs)]:
            v.times.append(v.step(ids))
    native = statistics.median(runs[0].times)
    compiled_native = next((v for v in runs if v.label == "native, compiled"), None)
    rows = []
    for v in runs:
        t = statistics.median(v.times)
        ref = compiled_native if v.label.endswith("compiled") and compiled_native else runs[0]
        rows.append(
            [
                name,
                v.label,
                f"{t * 1e3:.1f}",
                f"{t / native:.2f}",
                f"{t / statistics.median(ref.times):.2f}" if v.label.endswith("compiled") else "",
                f"{args.batch * args.context / t:,.0f}",
            ]
        )
        log(f"{name:6s} {v.label:28s} {t * 1e3:8.1f} ms  {t / native:5.2f}x native")
    return rows


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) of each graph variant")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny models, 2 rounds")
    p.add_argument("--out", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.context, args.batch, args.rounds, args.warmup = 1, 32, 16, 2, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[list[str]] = []
    for name in args.models:
        rows += bench(name, args, print)
    head = [
        f"{host_line()}; {threads_line()}; torch {torch.__version__}",
        f"{args.layers} layers, width {args.width}, vocab {args.vocab}, batch {args.batch} x {args.context} tokens, "
        f"median of {args.rounds} interleaved rounds",
        "",
    ]
    table = md_table(["model", "variant", "ms/step", "× native", "× compiled native", "tokens/s"], rows, "llrrrr")
    return emit("\n".join(head + table), args.out)


if __name__ == "__main__":
    main()
