"""Step-0 gradient norm of the model's own weights against native BP, per rule, at the
default feedback scale (W's own RMS) and at the paper's (Xavier's), on transformers and
timm models initialised as their libraries do.

    python benchmarks/safe_defaults.py --threads 1     # the table in RESULTS.md

The models are those of ``tests/test_safe_defaults.py`` (HF GPT-2, Llama, BERT at 3 layers,
width 64; timm ViT-S/16 at 64 px with 3 blocks; ConvNeXt-atto at 64 px), one batch, one
seed. The number is ``|grad W|_rule / |grad W|_BP`` over every matrix of the model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import pfa_fx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_safe_defaults import _grad_norm, _hf_lm

RULES = [("fa", {}), ("sf", {}), ("kp", {}), ("wm", {}), ("pfa", {}), ("pfa", {"compact": True})]


def _timm(name: str):
    import timm

    torch.manual_seed(0)
    kwargs = {"img_size": 64, "depth": 3} if name.startswith("vit") else {}
    model = timm.create_model(name, num_classes=10, **kwargs)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    return model, lambda m: torch.nn.functional.cross_entropy(m(x), y)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {
        "GPT-2": lambda: _hf_lm("gpt2"),
        "Llama": lambda: _hf_lm("llama"),
        "BERT": lambda: _hf_lm("bert"),
        "ViT-S/16": lambda: _timm("vit_small_patch16_224"),
        "ConvNeXt-atto": lambda: _timm("convnext_atto"),
    }
    names = [r + (" compact" if o else "") for r, o in RULES]
    print(f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} thread(s)")
    print("| model | scale | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for label, build in models.items():
        model, loss_fn = build()
        model.train()
        ref = _grad_norm(model, loss_fn)
        for scale in ("weight", "xavier"):
            cells = []
            for rule, opts in RULES:
                ratio = _grad_norm(pfa_fx.convert(model, rule, scale=scale, **opts), loss_fn) / ref
                cells.append(f"{ratio:.3g}")
            shown = "W's RMS (default)" if scale == "weight" else "Xavier"
            print(f"| {label} | {shown} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
