"""The command-line flags the Figure 4 and 5 scripts share, and their checks.

A script adds them to its own parser with :func:`add_common_args` (defaults from its
:class:`Defaults`: the paper's recipe for that figure), adds its own flags, parses, and
finishes with :func:`check_args` (smoke-mode defaults, ranges, ``--lr-rule``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CHECKPOINT, SHARDED
from .rules import RULES, parse_lr_rules

# torch.compile modes --compile accepts (``--compile`` alone: "default")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Defaults:
    """Per-script defaults for the shared flags (the paper's recipe for that figure)."""

    out: str
    epochs: int
    lr: float
    batch_size: int
    milestones: list[int]
    workers: int
    align_batch: int = 128


def add_common_args(p: argparse.ArgumentParser, d: Defaults) -> None:
    p.add_argument("--rules", nargs="+", choices=RULES, default=None, help="rules to train (default: all of pfa_fx.RULES; smoke: bp pfa)")  # fmt: skip
    p.add_argument("--data", type=Path, default=None, help="dataset root")
    p.add_argument("--out", type=Path, default=Path(d.out), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="initial weights, feedback state, batch order")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs per rule (default {d.epochs}; smoke: 1)")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    p.add_argument("--lr-rule", action="append", default=[], metavar="RULE=LR", help="learning rate for one rule instead of --lr (repeatable; the paper tunes it per rule)")  # fmt: skip
    p.add_argument("--schedule", choices=("step", "cosine", "constant"), default="step", help="lr schedule (per epoch)")
    p.add_argument("--milestones", type=int, nargs="*", default=d.milestones, help="step schedule: epochs where lr *= --gamma")  # fmt: skip
    p.add_argument("--gamma", type=float, default=0.1, help="step schedule factor")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (divided over ranks)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.01, help="weight decay during the first --wd-epochs")
    p.add_argument("--wd-factor", type=float, default=0.01, help="weight decay is multiplied by this afterwards")
    p.add_argument("--wd-epochs", type=int, default=1, help="epochs at the initial weight decay")
    p.add_argument("--expansion", type=float, default=10.0, help="n̄ / n_out for pfa and pfa-o")
    p.add_argument("--explicit-r", action="store_true", help="PFA keeps the explicit R (n̄ x n_in) instead of the compact S (exact under SGD)")  # fmt: skip
    p.add_argument("--sf-variant", choices=("usf", "frsf", "brsf"), default="usf", help="sign-concordant variant")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers per process")
    p.add_argument("--align-batch", type=int, default=d.align_batch, help="test images in the fixed gradient-alignment batch")  # fmt: skip
    p.add_argument("--limit-steps", type=int, default=None, help="cap on training steps per epoch (quick trials)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast the training forward to bf16")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and inputs")
    p.add_argument("--compile", nargs="?", const="default", default=False, choices=COMPILE_MODES, metavar="MODE", help=f"torch.compile the training model; MODE: {', '.join(COMPILE_MODES)} (default when left out)")  # fmt: skip
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks (CUDA only), applied before convert")  # fmt: skip
    p.add_argument("--fsdp", action="store_true", help=f"shard model, feedback and optimizer state over the ranks with FSDP2 (fully_shard per block, then the root) instead of DDP; converts with capture='modules'; checkpoints are the folder --out/{SHARDED} (torch.distributed.checkpoint). Under torchrun (without it: one process)")  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per process (default: torch's; smoke: 1)"
    )
    p.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        help="TensorBoard dir (needs tensorboard); also writes --out/alignment_<rule>.csv via pfa_fx.AlignmentLogger",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--smoke", action="store_true", help="seconds-long run on generated data (CI)")
    p.add_argument("--resume", action="store_true", help=f"continue from --out/{CHECKPOINT} (starts afresh if there is none)")  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS", help=f"also write --out/{CHECKPOINT} every STEPS training steps (0: at the end of every epoch only)")  # fmt: skip
    p.add_argument("--no-checkpoint", action="store_true", help=f"write no {CHECKPOINT}")
    # for tests: leave cleanly, right after writing the checkpoint, as a killed job would have left it;
    # epochs and steps count over the rules in turn (rule i's epoch e is epoch i * --epochs + e)
    p.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop-after-step", type=int, default=None, help=argparse.SUPPRESS)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, defaults: Defaults) -> argparse.Namespace:
    if args.epochs is None:
        args.epochs = 1 if args.smoke else defaults.epochs
    if args.rules is None:
        args.rules = ["bp", "pfa"] if args.smoke else list(RULES)
    args.lr_rule = parse_lr_rules(p, args.lr_rule, RULES)
    if args.threads is None and args.smoke:
        args.threads = 1  # small convs on a shared CPU: more threads only oversubscribe it
    args.rules = list(dict.fromkeys(args.rules))
    for flag in ("epochs", "batch_size", "align_batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        print("note: tensorboard is not installed; --tensorboard writes only the alignment_<rule>.csv files")
    if args.wd_epochs < 0 or args.workers < 0:
        p.error("--wd-epochs and --workers must be >= 0")
    if args.limit_steps is not None and args.limit_steps < 1:
        p.error("--limit-steps must be >= 1")
    if args.checkpoint_every < 0:
        p.error("--checkpoint-every must be >= 0")
    if args.no_checkpoint and (args.checkpoint_every or args.stop_after_epoch or args.stop_after_step):
        p.error("--no-checkpoint excludes --checkpoint-every (and stopping to resume)")
    if args.fsdp:
        check_fsdp(p, args)
    return args


def check_fsdp(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what ``--fsdp`` cannot be combined with, saying why."""
    import torch.distributed as dist

    if not dist.is_available():
        p.error("--fsdp needs torch.distributed, which this torch build lacks")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        p.error("--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)")
    if args.compile:
        # the harness compiles the whole training model; FSDP2's per-block hooks with
        # pfa_fx's feedback ops under torch.compile are untested: run eager
        p.error("--fsdp excludes --compile (FSDP2 with torch.compile is not supported by this harness)")
    if args.channels_last:
        # FSDP2 shards contiguous parameters along dim 0; channels_last convolution weights are strided
        p.error("--fsdp excludes --channels-last (FSDP2 does not shard channels_last parameters)")


def argv_list(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)
