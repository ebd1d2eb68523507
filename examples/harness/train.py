"""Training one rule (:func:`train_rule`): conversion, the SGD loop, evaluation.

The paper's recipe: Xavier-uniform initial weights (:func:`xavier_init_`), SGD with
momentum, the ``--schedule`` of :func:`lr_factor`, and weight decay multiplied by
``--wd-factor`` after ``--wd-epochs``. After every epoch the rule's test metrics and
alignments are recorded (:mod:`.outputs`); the run is checkpointed as it goes
(:mod:`.checkpoint`) and continues from a checkpoint's state. The gradient-alignment
probe runs on every rank, so that ranks stay identical whatever it does to a rule's state.

Under ``--fsdp`` the copy is converted with ``capture="modules"`` and sharded in place
(:func:`.distributed.wrap_fsdp`) before the optimizer is built on its sharded parameters;
the weight alignment is read with every block's weights gathered
(:func:`.distributed.full_weights`), and evaluation runs as many forwards on every rank
(each one gathers weights: a collective).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import pfa_fx

from .checkpoint import Checkpointer, load_rank_buffers, load_sharded, set_rng_state
from .data import EpochSampler, SeededItems, mix_seed
from .distributed import Dist, average_bn_stats, full_weights, wrap_ddp, wrap_fsdp
from .outputs import Recorder, alignment_logger, finite_mean, layer_table
from .rules import rule_lr, rule_options

if TYPE_CHECKING:
    from .experiment import Task


def xavier_init_(model: nn.Module) -> nn.Module:
    """The paper's recipe: Xavier-uniform weights and zero biases for every conv and linear."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _to(x: Tensor, d: Dist, channels_last: bool) -> Tensor:
    x = x.to(d.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _autocast(args: argparse.Namespace, d: Dist) -> contextlib.AbstractContextManager:
    if args.amp == "bf16":
        return torch.autocast(d.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(args: argparse.Namespace, epoch: int) -> float:
    """Multiplier of --lr during (0-based) epoch ``epoch``."""
    if args.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    if args.schedule == "step":
        return args.gamma ** sum(epoch >= m for m in args.milestones)
    return 1.0


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(model)`` in ``mode`` (``"default"``: torch's default mode)."""
    return torch.compile(model, mode=None if mode == "default" else mode)


@torch.no_grad()
def evaluate(
    gm: nn.Module,
    loader: DataLoader,
    args: argparse.Namespace,
    d: Dist,
    pad: tuple[int, Tensor] | None = None,
) -> tuple[float, float, float]:
    """(mean cross-entropy, top-1, top-5 accuracy) over the whole test set, all ranks together.

    ``pad`` (under ``--fsdp``): ``(batches, x)``: a rank whose shard of the test set has
    fewer than ``batches`` batches runs the model on ``x`` until it has run as many forwards
    (its output dropped), as each forward of a sharded model is a collective."""
    gm.eval()
    loss, top1, top5, n = 0.0, 0.0, 0.0, 0.0
    batches = 0
    for x, y in loader:
        batches += 1
        x, y = _to(x, d, args.channels_last), y.to(d.device, non_blocking=True)
        with _autocast(args, d):
            out = gm(x)
        out = out.float()
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        top1 += float((top[:, 0] == y).sum())
        top5 += float((top == y[:, None]).any(1).sum())
        n += len(y)
    if pad is not None:
        for _ in range(pad[0] - batches):
            with _autocast(args, d):
                gm(_to(pad[1], d, args.channels_last))
    loss, top1, top5, n = d.all_sum([loss, top1, top5, n])
    return loss / max(n, 1), top1 / max(n, 1), top5 / max(n, 1)


def fixed_batch(dataset: Dataset, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` test images (deterministic transform): the gradient-alignment batch."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def gradient_angles(gm: nn.Module, batch: tuple[Tensor, Tensor], args: argparse.Namespace, d: Dist) -> dict[str, float]:
    """Angle per op between the rule's weight update and BP's on the fixed batch (fp32, eval mode).

    Run on every rank, not only the one that records it, so that whatever the probe does
    to a rule's state stays the same on all ranks (``pfa_fx.gradient_alignment`` puts
    per-batch counters such as brSF's draw index back, so training's streams do not move).
    """
    x, y = _to(batch[0], d, args.channels_last), batch[1].to(d.device)
    gm.eval()
    return pfa_fx.gradient_alignment(gm, lambda: F.cross_entropy(gm(x), y))


def train_rule(
    init: nn.Module,
    rule: str,
    task: Task,
    args: argparse.Namespace,
    d: Dist,
    rec: Recorder,
    ckpt: Checkpointer,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert a copy of ``init`` to ``rule``, train it and record its curves; returns timing info.

    ``state`` (``Checkpointer.load``) continues the rule from a checkpoint; the result then
    matches an uninterrupted run's bit for bit on the CPU. ``"stopped"`` in the result: the
    run left early (``--stop-after-epoch``/``--stop-after-step``) after checkpointing.
    """
    torch.manual_seed(args.seed + d.rank)  # model-side randomness (e.g. dropout): same for every rule
    # capture="modules": each weight op runs in its owner's forward, where FSDP2 gathers it
    capture = {"capture": "modules"} if d.fsdp else {}
    gm = pfa_fx.convert(copy.deepcopy(init), rule, seed=args.seed, **capture, **rule_options(rule, args))
    gm.to(d.device)
    if args.channels_last:
        gm.to(memory_format=torch.channels_last)
    layers = layer_table(gm)  # before sharding: whole weight shapes
    if d.fsdp:
        wrap_fsdp(gm, d)  # in place: from here on its parameters are sharded (DTensors)
    lr = rule_lr(rule, args)
    order = args.rules.index(rule)  # the hidden --stop-after-* flags count epochs and steps over all rules
    params = list(gm.parameters())
    if d.fsdp:
        # capture="modules" holds fixed feedback (FA's B, PFA's G, ...) as frozen parameters, as
        # FSDP2 shards parameters only; no optimizer steps them, and other conversions keep them
        # as buffers: leave them out. (FSDP2's lazy init also re-registers the ones held squeezed
        # as new tensors, which an optimizer holding the old ones could not name in its state dict.)
        params = [p for p in params if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(args, e))
    if state is not None:  # before DDP (which broadcasts rank 0's weights) and torch.compile
        if d.fsdp:
            load_sharded(state["sharded"], gm, opt)  # every rank its own shards
        else:
            gm.load_state_dict(state["model"])  # feedback state too, counters included (extra state)
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    model = wrap_ddp(gm, d) if d.distributed and not d.fsdp else gm
    if state is not None:  # after DDP, whose construction copies rank 0's buffers to every rank
        load_rank_buffers(gm, state["ranks"][d.rank]["buffers"])
    step_model = compile_model(model, args.compile) if args.compile else model

    per_rank = max(1, args.batch_size // d.world)
    sampler = EpochSampler(task.train_set, d, args.seed)
    cuda = d.device.type == "cuda"
    loader = DataLoader(
        SeededItems(task.train_set, args.seed),
        batch_size=per_rank,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=cuda,
        drop_last=True,
        generator=torch.Generator(),  # reseeded per epoch: workers' seeds are a function of (seed, epoch, rank)
    )
    test_loader = DataLoader(
        Subset(task.test_set, range(d.rank, len(task.test_set), d.world)),
        batch_size=per_rank * 2,
        num_workers=args.workers,
        pin_memory=cuda,
    )
    steps = len(loader) if args.limit_steps is None else min(len(loader), args.limit_steps)
    if steps == 0:
        raise SystemExit(f"{len(task.train_set)} training images < one global batch of {args.batch_size}")
    align_batch = fixed_batch(task.test_set, args.align_batch)
    pad = None
    if d.fsdp:  # rank 0's shard of the test set is the largest: every rank runs as many forwards
        pad = (math.ceil(math.ceil(len(task.test_set) / d.world) / test_loader.batch_size), align_batch[0][:1])
    tb = None
    if args.tensorboard is not None and d.main:
        tb = alignment_logger(args, rule, state)

    def log_epoch(epoch: int, **scalars: float) -> dict[str, Any]:
        test_loss, acc, acc5 = evaluate(gm, test_loader, args, d, pad)
        info: dict[str, Any] = {"test_acc": acc, "test_loss": test_loss}
        grad = gradient_angles(gm, align_batch, args, d)
        with full_weights(gm, d):  # under --fsdp every rank gathers (a collective); rank 0 reads
            if d.main:
                align = pfa_fx.alignment(gm)  # may leave ops out (DFA has no W-shaped feedback)
                rec.scalar(rule, epoch, test_acc=acc, test_acc5=acc5, test_loss=test_loss, **scalars)
                rec.layers(rule, epoch, "angle_deg", {k: a for k, (a, _) in align.items()}, layers)
                rec.layers(rule, epoch, "norm_ratio", {k: r for k, (_, r) in align.items()}, layers)
                rec.layers(rule, epoch, "grad_angle_deg", grad, layers)
                info |= {"angle": finite_mean(a for a, _ in align.values()), "grad": finite_mean(grad.values())}
                if tb is not None:
                    tb.log(epoch, gm, extra={"test_acc": acc, "test_loss": test_loss, **scalars}, gradient_angles=grad)
                rec.write()
        return info

    start = time.perf_counter()
    first, skip, train_s = 1, 0, 0.0
    if state is None:
        log_epoch(0, lr=lr, weight_decay=args.weight_decay)
    else:  # epoch 0 and every epoch up to state["epoch"] are in the restored rows
        first, skip, train_s = state["epoch"] + 1, state["step"], state["train_s"]
        # last, so nothing above (conversion, data setup) moves the restored streams
        set_rng_state(state["ranks"][d.rank]["rng"], d)
    bar = tqdm(
        total=args.epochs * steps,
        initial=(first - 1) * steps + skip,
        desc=f"{task.name} {rule}",
        unit="step",
        disable=args.no_progress or not d.main,
    )
    diverged, stopped, info, where = False, False, {}, {}
    for epoch in range(first, args.epochs + 1):
        mid = state is not None and epoch == first and skip > 0  # resuming inside this epoch
        if epoch == args.wd_epochs + 1 and not mid:  # (a mid-epoch checkpoint has it applied already)
            for group in opt.param_groups:
                group["weight_decay"] *= args.wd_factor
        lr_now, wd = opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]
        sampler.set_epoch(epoch, skip=skip * per_rank)
        loader.generator.manual_seed(mix_seed("loader", args.seed, epoch, d.rank))
        gm.train()
        total = torch.zeros((), dtype=torch.float64, device=d.device)
        seen, epoch_s = 0, 0.0
        if mid:
            mine = state["ranks"][d.rank]
            total += mine["loss_sum"]  # float64 -> float64: exact
            seen, epoch_s = mine["seen"], state["epoch_s"]
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader, start=skip):
            if i == steps:
                break
            x, y = _to(x, d, args.channels_last), y.to(d.device, non_blocking=True)
            with _autocast(args, d):
                loss = F.cross_entropy(step_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(y)
            seen += len(y)
            bar.update()
            if i % 20 == 0 and not args.no_progress and d.main:
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3g}", refresh=False)
            done_steps = (epoch - 1) * steps + i + 1
            stop_here = args.stop_after_step == (order * args.epochs * steps + done_steps)
            if i + 1 < steps and (stop_here or (args.checkpoint_every and done_steps % args.checkpoint_every == 0)):
                now = time.perf_counter()
                ckpt.save(rule, gm, opt, sched, epoch=epoch - 1, step=i + 1, loss_sum=float(total), seen=seen,
                          train_s=train_s, epoch_s=epoch_s + now - t0)  # fmt: skip
                t0 += time.perf_counter() - now  # writing is not training time
                if stop_here:
                    stopped, where = True, {"epoch": epoch - 1, "step": i + 1}
                    break
        skip = 0
        if stopped:
            break
        sched.step()
        loss_sum, n = d.all_sum([float(total), float(seen)])
        train_loss = loss_sum / max(n, 1)
        epoch_s += time.perf_counter() - t0
        train_s += epoch_s
        average_bn_stats(gm, d)
        info = log_epoch(epoch, train_loss=train_loss, lr=lr_now, weight_decay=wd, epoch_time_s=epoch_s)
        bar.set_postfix(epoch=epoch, loss=f"{train_loss:.3g}", acc=f"{info['test_acc']:.3f}", refresh=True)
        diverged = not math.isfinite(train_loss)
        finished = None
        if diverged or epoch == args.epochs:
            finished = {"train_s": train_s, "total_s": time.perf_counter() - start, "diverged": diverged, "layers": layers}  # fmt: skip
        ckpt.save(rule, gm, opt, sched, epoch=epoch, step=0, loss_sum=0.0, seen=0, train_s=train_s, epoch_s=0.0, finished=finished)  # fmt: skip
        if diverged:
            if d.main:
                tqdm.write(f"warning: {rule} diverged at epoch {epoch} (train loss {train_loss}); stopping this rule")
            break
        run_epoch = order * args.epochs + epoch
        if args.stop_after_epoch == run_epoch or args.stop_after_step == run_epoch * steps:
            stopped, where = True, {"epoch": epoch, "step": 0}
            break
    bar.close()
    if tb is not None:
        tb.close()
    if stopped:
        return {"stopped": True, **where}
    if d.main:
        extra = f", mean W-W_b angle {info['angle']:.1f}°, mean grad angle {info['grad']:.1f}°"
        tqdm.write(f"{rule}: test acc {100 * info['test_acc']:.2f}%{extra} ({train_s:.1f} s training)")
    return {"train_s": train_s, "total_s": time.perf_counter() - start, "diverged": diverged, "layers": layers}
