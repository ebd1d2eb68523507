"""A converted model under DistributedDataParallel (2 CPU processes, gloo) trains exactly
as one process on the same global batch, with no feedback state ever communicated."""

import inspect
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import pfa_fx
from tests.nets import MLP

STEPS = 4
DDP_ARGS = inspect.signature(DDP.__init__).parameters
RULES = ["pfa", "kp", "sf"]


def _data():
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 20, generator=gen, dtype=torch.float64), torch.randint(0, 4, (8,), generator=gen))
        for _ in range(STEPS)
    ]


def _model(rule):
    torch.manual_seed(0)
    opts = {"expansion": 3} if rule == "pfa" else ({"variant": "brsf"} if rule == "sf" else {})
    return pfa_fx.convert(MLP().double(), rule, seed=5, **opts)


def _train(model, data, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for x, y in data:
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        F.cross_entropy(model(x[shard]), y[shard]).backward()
        opt.step()


def _worker(rank, world, port, rule, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # ranks' global RNGs differ: feedback must not care
        model = _model(rule)
        # nothing in feedback state needs broadcasting: it is drawn from (seed, op name)
        no_sync = (
            {"forward_sync_buffers": False} if "forward_sync_buffers" in DDP_ARGS else {"broadcast_buffers": False}
        )
        ddp = DDP(model, **no_sync)
        _train(ddp, _data(), rank, world)
        torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
        dist.barrier()  # both ranks done before gloo's threads are torn down
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("rule", RULES)
def test_ddp_two_processes_match_single_process_training(rule, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), rule, str(tmp_path)), nprocs=2, join=True)
    single = _model(rule)
    _train(single, _data())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for k, v in single.state_dict().items():
        if not isinstance(v, torch.Tensor):  # brSF's batch counter
            assert ranks[0][k] == ranks[1][k] == v
            continue
        assert torch.equal(ranks[0][k], ranks[1][k]), f"ranks disagree on {k}"
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-10, atol=1e-12, msg=f"DDP differs from one process: {k}")
