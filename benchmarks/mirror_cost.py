"""What ``pfa_fx.mirror`` reaches and costs: angle before/after (and PFA's floor) per rule, and
the time of the pass in BP training steps of the same model, measured in this process.

    python benchmarks/mirror_cost.py --threads 1            # the table in RESULTS.md
    python benchmarks/mirror_cost.py --models mlp --steps 100 --quick

Models: the paper's 784-256-256-10 MLP (Xavier init, as ``examples/mnist_fig2.py``), a timm
``resnet18`` (``in_chans=1``, 10 classes, BP-trained for ``--pretrain-steps`` on random
images so that W is no longer its init), and the LM example's byte-level Llama (2 layers,
width 128). Each model is converted with each plastic rule and mirrored ``--steps`` times
(``schedule="average"``, ``batch=64``); the angle is the mean over ops of
``pfa_fx.alignment``, the floor the mean of ``pfa_fx.floor_alignment``. The cost is the
pass's wall time divided by the median of 5 plain BP training steps of the same model on a
batch of ``--batch`` inputs, timed right before it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import pfa_fx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import cpu_name, git_revision

RULES = {"kp": {}, "wm": {}, "pal": {}, "pfa": {}, "pfa compact": {"compact": True}, "pfa-o": {}}


def _mlp() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
    return net, lambda b: (torch.randn(b, 784), torch.randint(0, 10, (b,)))


def _resnet() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    net = timm.create_model("resnet18", in_chans=1, num_classes=10)
    return net, lambda b: (torch.randn(b, 1, 32, 32), torch.randint(0, 10, (b,)))


def _llama() -> tuple[nn.Module, callable]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg), lambda b: (torch.randint(0, 256, (b, 128)), None)


MODELS = {"mlp": _mlp, "resnet18": _resnet, "llama": _llama}


def _loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    if y is None:
        return model(input_ids=x, labels=x).loss
    return F.cross_entropy(model(x), y)


def _bp_step_s(model: nn.Module, make, batch: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for _ in range(6):
        data = make(batch)
        t0 = time.perf_counter()
        opt.zero_grad()
        _loss(model, data).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32, help="inputs per BP step of the cost's unit")
    p.add_argument("--pretrain-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.pretrain_steps = min(args.steps, 20), 2
    torch.set_num_threads(args.threads)
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, {args.threads} thread(s), torch {torch.__version__}, "
          f"pfa_fx at {git_revision()}; mirror steps {args.steps}, batch 64")  # fmt: skip
    print("| model | rule | ∠W_b before | after | floor | mirror time | × one BP step |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model, make = MODELS[name]()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(args.pretrain_steps):  # move W off its init
            opt.zero_grad()
            _loss(model, make(args.batch)).backward()
            opt.step()
        for rule in args.rules:
            gm = pfa_fx.convert(model, rule.split()[0], **RULES[rule])
            before = statistics.mean(a for a, _ in pfa_fx.alignment(gm).values())
            step_s = _bp_step_s(model, make, args.batch)
            t0 = time.perf_counter()
            pfa_fx.mirror(gm, steps=args.steps, batch=64)
            took = time.perf_counter() - t0
            after = statistics.mean(a for a, _ in pfa_fx.alignment(gm).values())
            floors = pfa_fx.floor_alignment(gm)
            floor = f"{statistics.mean(floors.values()):.1f}" if floors else "–"
            print(f"| {name} | {rule} | {before:.1f} | {after:.1f} | {floor} | {took:.1f} s | {took / step_s:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
