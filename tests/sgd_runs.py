"""What the implicit-form tests (kp and compact pfa with ``implicit=True``) share: the small
nets and the SGD run — momentum, weight decay, a step schedule and a manual lr change —
along which an implicit form must follow its explicit one."""

from __future__ import annotations

import copy

import torch
from torch import nn

import pfa_fx
from tests.nets import MLP


class ConvNet(nn.Module):
    """A plain conv, a grouped strided conv (groups=2) and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.grouped(x))
        return self.fc(x.flatten(1))


NETS = {
    "mlp": (lambda: MLP((20, 16, 12, 4)), (6, 20)),
    "conv": (ConvNet, (4, 3, 8, 8)),
}


def nodes(gm: nn.Module) -> dict[str, pfa_fx.FeedbackNode]:
    return dict(pfa_fx.feedback_modules(gm))


def sgd(model: nn.Module, **kw):
    """SGD (lr 0.05, momentum 0.9, weight decay 1e-2, ``kw`` on top) and a StepLR schedule."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2, **kw)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def train(model: nn.Module, opt, sched, batches) -> None:
    for i, x in enumerate(batches):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()
        if i == 6:  # a manual change on top of the schedule
            for g in opt.param_groups:
                g["lr"] *= 3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def resumes_exactly(a: nn.Module, fresh, shape: tuple[int, ...]) -> dict:
    """Train ``a`` 4 steps (nesterov SGD), checkpoint model, optimizer and schedule, load them
    into ``fresh()`` and train both 4 more steps: every state_dict entry must be equal.
    Returns the checkpoint's model state."""
    torch.manual_seed(3)
    batches = [torch.randn(shape, dtype=torch.float64) for _ in range(8)]
    opt_a, sched_a = sgd(a, nesterov=True)
    train(a, opt_a, sched_a, batches[:4])
    saved = (copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict()), sched_a.state_dict())
    b = fresh()
    opt_b, sched_b = sgd(b, nesterov=True)
    b.load_state_dict(saved[0])
    opt_b.load_state_dict(saved[1])
    sched_b.load_state_dict(saved[2])
    train(a, opt_a, sched_a, batches[4:])
    train(b, opt_b, sched_b, batches[4:])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    return saved[0]


def check_float64_scalars_and_a_lone_copy(implicit: nn.Module, shape: tuple[int, ...]) -> None:
    """α stays float64 under ``.float()`` (D0 follows W), and a deep copy steps alone."""
    f32 = copy.deepcopy(implicit).float()
    n = nodes(f32)["0"]
    assert n.alpha.dtype == torch.float64 and n.D0.dtype == torch.float32
    opt = torch.optim.SGD(f32.parameters(), lr=0.1, weight_decay=0.1)
    f32(torch.randn(shape)).sum().backward()
    opt.step()
    assert int(n.steps) == 1 and float(n.alpha) == 1 - 0.1 * 0.1
    assert int(nodes(implicit)["0"].steps) == 0  # the original was not stepped
