"""A learning rule of your own, registered with pfa_fx and trained like the built-in ones.

The rule: *noisy symmetric feedback*, ``W_b = W + N`` with ``N`` fixed random at ``noise``
times W's own RMS — between backprop (``noise=0``) and feedback dominated by noise. It is
written in the two parts every rule has: a config (its options, a frozen dataclass checked
when it is built) and a node (its state and its feedback weight). After
``pfa_fx.register_rule`` it converts any model, trains, saves and loads, shows in
``pfa_fx.report`` and is measured by ``pfa_fx.alignment``.

Usage::

    python examples/custom_rule.py                 # sklearn's 8x8 digits, BP vs noise 0.5 and 2, ~10 s
    python examples/custom_rule.py --noise 1 4 --epochs 20
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import pfa_fx


# --8<-- [start:rule]
@dataclass(frozen=True)
class NoisyBP(pfa_fx.RuleConfig):
    """Options of noisy symmetric feedback.

    Args:
        noise: the standard deviation of ``N`` relative to W's RMS (>= 0).
    """

    noise: float = 0.5

    def validate(self) -> None:
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or self.noise < 0:
            raise pfa_fx.ConversionError(f"noisy-bp: noise must be a number >= 0, got {self.noise!r}")


class NoisyBPNode(pfa_fx.FeedbackNode):
    """``W_b = W + N``: ``N`` drawn once from the op's seeded generator, saved with the model."""

    config_type = NoisyBP

    def __init__(self, weight: Tensor, *, generator: torch.Generator, **kwargs):
        super().__init__(weight, generator=generator, **kwargs)  # builds self.rule_config
        self.noise = self.rule_config.noise  # node.config reads the options from attributes
        rms = float(weight.detach().double().square().mean().sqrt())
        self.register_buffer("N", self.draw(tuple(weight.shape), generator, weight, self.noise * rms))

    def state(self) -> tuple[Tensor, ...]:
        return (self.N,)  # what the op hands its backward (N is fixed: no gradient)

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        return weight + state[0]


pfa_fx.register_rule("noisy-bp", NoisyBP, NoisyBPNode, replace=True)
# --8<-- [end:rule]


def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 digits (shipped with it), split 1,500 / 297."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def train(rule: pfa_fx.RuleConfig | str, epochs: int, seed: int) -> tuple[float, float]:
    """Test accuracy and the mean feedback angle (degrees) after training an MLP with ``rule``."""
    x, y, xt, yt = digits()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    model = pfa_fx.convert(net, rule, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    angles = [a for a, _ in pfa_fx.alignment(model).values()]
    return acc, sum(angles) / len(angles)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noise", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print("| rule | test accuracy | mean angle W_b vs W (deg) |\n|---|---:|---:|")
    for label, rule in [("bp", "bp"), *((f"noisy-bp {n}", NoisyBP(noise=n)) for n in args.noise)]:
        acc, angle = train(rule, args.epochs, args.seed)
        print(f"| {label} | {acc:.3f} | {angle:.1f} |")


if __name__ == "__main__":
    main()
