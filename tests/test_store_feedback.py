"""``store_feedback=False``: fixed random feedback redrawn in every backward instead of held.

The unstored conversion must train exactly as the stored one with the same seed (gradients
equal bit for bit over SGD steps), hold nothing W-sized that is fixed, follow the model's
moves as a stored buffer would, and load checkpoints of the stored form (and back)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pfa_fx
from pfa_fx.draws import CastTrail, gaussian_pieces
from pfa_fx.errors import ConversionError, ConversionTypeError

# name -> (rule, options) of every conversion that redraws something under store_feedback=False
CASES: dict[str, tuple[str, dict]] = {
    "fa": ("fa", {}),
    "fa-weight-scale": ("fa", {"scale": "weight"}),
    "sf-frsf": ("sf", {"variant": "frsf"}),
    "pfa-x1": ("pfa", {"expansion": 1}),
    "pfa-x2.5": ("pfa", {"expansion": 2.5}),
    "pfa-x10": ("pfa", {"expansion": 10}),
    "pfa-population": ("pfa", {"expansion": 4, "route": "population"}),
    "pfa-sparse": ("pfa", {"expansion": 3, "density": 0.4}),
    "pfa-o": ("pfa-o", {"expansion": 2}),
    "dfa": ("dfa", {}),
}


def _nodes(model: nn.Module) -> dict:
    return dict(pfa_fx.feedback_modules(model))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))


class _CNN(nn.Module):
    """A plain, a grouped (feedback per group) and a transposed convolution, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = F.relu(self.grouped(x))
        return self.head(torch.tanh(self.up(x)).flatten(1))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return _CNN()


NETS = {"mlp": (_mlp, (6, 20)), "cnn": (_cnn, (4, 3, 8, 8))}


def _pair(net: str, rule: str, opts: dict, seed: int = 3) -> tuple[nn.Module, nn.Module]:
    base = NETS[net][0]()
    stored = pfa_fx.convert(base, rule, seed=seed, **opts)
    unstored = pfa_fx.convert(base, rule, seed=seed, store_feedback=False, **opts)
    return stored, unstored


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (the rule's plastic state included) and the input's."""
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    out = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    out["input"] = x.grad
    return out


def _assert_same_training(stored: nn.Module, unstored: nn.Module, shape: tuple, steps: int = 3) -> None:
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) for m in (stored, unstored)]
    for step in range(steps):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step), dtype=next(stored.parameters()).dtype)
        a, b = _grads(stored, x), _grads(unstored, x)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"step {step}: gradients differ for {different}"
        for opt in opts:
            opt.step()


# ------------------------------------------------------------------- the redraw itself
def test_pieces_of_a_gaussian_draw_are_the_whole_draw_and_leave_the_generator_where_it_does():
    for numel in (1, 15, 16, 17, 40, 1000, 1000 + 7, 3 * 64 + 15, 3 * 64 + 16, 5000):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        whole = torch.randn(numel, generator=g1, dtype=torch.float64) * 0.3
        parts = torch.cat([v for _, _, v in gaussian_pieces(g2, numel, 0.3, piece=64)])
        assert torch.equal(whole, parts), numel
        assert torch.equal(g1.get_state(), g2.get_state()), numel


def test_cast_trail_repeats_rounding_casts_and_forgets_exact_ones():
    trail = CastTrail(torch.float32)
    for dtype in (torch.float64, torch.float32, torch.float64, torch.float16, torch.float32, torch.float16):
        trail.moved_to(dtype)
    assert trail.rounded == [torch.float32, torch.float16] and trail.dtype == torch.float16
    draw = torch.randn(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(trail.apply(draw), draw.float().double().float().half().float().half())


# ------------------------------------------------------------- the same training, bit for bit
@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("case", list(CASES))
def test_unstored_feedback_trains_bit_for_bit_as_the_stored_one(case, net):
    rule, opts = CASES[case]
    stored, unstored = _pair(net, rule, opts)
    _assert_same_training(stored, unstored, NETS[net][1])


def test_unstored_feedback_trains_bit_for_bit_as_the_stored_one_in_float64():
    for rule, opts in (CASES["fa"], CASES["sf-frsf"], CASES["pfa-x2.5"], CASES["dfa"]):
        base = _cnn().double()  # converted in float64: the draw is never rounded
        stored = pfa_fx.convert(base, rule, seed=1, **opts)
        unstored = pfa_fx.convert(base, rule, seed=1, store_feedback=False, **opts)
        _assert_same_training(stored, unstored, NETS["cnn"][1], steps=2)


def test_unstored_feedback_trains_bit_for_bit_under_bfloat16_autocast():
    for rule, opts in (CASES["fa"], CASES["sf-frsf"], CASES["pfa-x2.5"]):
        stored, unstored = _pair("cnn", rule, opts)
        x = torch.randn(NETS["cnn"][1], generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = _grads(stored, x), _grads(unstored, x)
        assert all(torch.equal(a[k], b[k]) for k in a), rule


@pytest.mark.parametrize("move", ["double", "half-then-float", "channels_last"])
def test_moves_of_the_model_redraw_as_the_stored_buffer_was_cast(move):
    for rule, opts in (CASES["fa"], CASES["sf-frsf"], CASES["pfa-x2.5"]):
        stored, unstored = _pair("cnn", rule, opts)
        for m in (stored, unstored):
            if move == "double":
                m.double()  # float32 values held in float64, not the float64 draw
            elif move == "half-then-float":
                m.half().float()  # half-precision values held in float32
            else:
                m.to(memory_format=torch.channels_last)
        for name, node in _nodes(unstored).items():
            (fixed,) = node.fixed_draws
            held = getattr(_nodes(stored)[name], fixed)
            redrawn = node.redraw(fixed)
            assert redrawn.dtype == held.dtype and torch.equal(redrawn, held), (rule, name)
            if fixed == "B" and rule == "fa":  # a kernel: the layout BP's backward call sees
                assert redrawn.stride() == held.stride(), (rule, name)
        shape = NETS["cnn"][1]
        if move == "channels_last":
            x = torch.randn(shape).to(memory_format=torch.channels_last)
            a, b = _grads(stored, x), _grads(unstored, x)
            assert all(torch.equal(a[k], b[k]) for k in a), rule
        else:
            _assert_same_training(stored, unstored, shape, steps=1)


# --------------------------------------------------------------------- what is held
@pytest.mark.parametrize("case", ["fa", "sf-frsf", "pfa-x2.5", "pfa-sparse", "pfa-o"])
def test_unstored_conversion_holds_no_fixed_w_sized_tensor(case):
    rule, opts = CASES[case]
    stored, unstored = _pair("cnn", rule, opts)
    for name, node in _nodes(unstored).items():
        twin = _nodes(stored)[name]
        (fixed,) = node.fixed_draws
        assert fixed in twin.state_dict() and fixed not in node.state_dict()
        assert all(b.numel() <= 4 for b in node.buffers())  # only the 0- or 4-number placement probe
        probe = sum(b.numel() for b in node.buffers())
        snapshot = 5056 if opts.get("density", 1) < 1 else 0  # the CPU generator's state, where the mask starts
        assert node.state_numel() == twin.state_numel() - getattr(twin, fixed).numel() + probe + snapshot
        assert node.draws_from_seed and not twin.draws_from_seed


def test_unstored_dfa_caches_no_projection():
    stored, unstored = _pair("cnn", "dfa", {})
    x = torch.randn(NETS["cnn"][1])
    _grads(stored, x), _grads(unstored, x)
    assert sum(n.state_numel() for n in _nodes(stored).values()) > 0  # the cached projections
    assert all(n.state_numel() == 0 and not n._cache for n in _nodes(unstored).values())


def test_the_backward_keeps_no_redrawn_tensor():
    for rule, opts in (CASES["fa"], CASES["sf-frsf"], CASES["pfa-x2.5"]):
        _, unstored = _pair("cnn", rule, opts)
        _grads(unstored, torch.randn(NETS["cnn"][1]))
        for node in _nodes(unstored).values():
            kept = [k for k, v in vars(node).items() if isinstance(v, torch.Tensor) and v.numel() > 4]
            kept += [k for k, v in [*node.named_buffers(), *node.named_parameters()] if v.numel() > 4]
            assert kept == (["R"] if rule == "pfa" else []), (rule, kept)


def test_compact_pfa_keeps_g_stored_and_the_option_changes_nothing():
    for implicit in (False, True):
        stored, unstored = _pair("cnn", "pfa", {"expansion": 3, "compact": True, "implicit": implicit})
        for name, node in _nodes(unstored).items():
            twin = _nodes(stored)[name]
            assert node.fixed_draws == () and not node.draws_from_seed
            assert set(node.state_dict()) == set(twin.state_dict()) and "G" in node.state_dict()
        _assert_same_training(stored, unstored, NETS["cnn"][1], steps=2)


def test_feedback_weight_and_alignment_are_those_of_the_stored_conversion():
    for case in ("fa", "sf-frsf", "pfa-x2.5", "pfa-o"):
        stored, unstored = _pair("cnn", *CASES[case])
        for name, node in _nodes(unstored).items():
            assert torch.equal(node.feedback_weight(), _nodes(stored)[name].feedback_weight()), (case, name)
        assert pfa_fx.alignment(stored) == pfa_fx.alignment(unstored)


def test_the_default_conversion_is_what_it_was():
    gm = pfa_fx.convert(_mlp(), "fa", seed=3)
    for node in _nodes(gm).values():
        assert node.config == {"scale": "weight"} and "store_feedback" not in repr(node)
        assert node.store_feedback and set(node.state_dict()) == {"B"} and not node.draws_from_seed
    explicit = pfa_fx.convert(_mlp(), "fa", seed=3, store_feedback=True)
    assert all(torch.equal(a, b) for a, b in zip(gm.state_dict().values(), explicit.state_dict().values()))
    node = _nodes(pfa_fx.convert(_mlp(), "pfa", store_feedback=False))["0"]
    assert node.config["store_feedback"] is False and "store_feedback=False" in repr(node)


# ------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("rule", ["kp", "wm", "pal"])
def test_rules_with_learned_feedback_refuse_to_leave_it_unstored(rule):
    with pytest.raises(
        ConversionError, match=rf"^{rule}: store_feedback=False is refused: {rule}'s feedback B is learned"
    ):
        pfa_fx.convert(_mlp(), rule, store_feedback=False)
    with pytest.raises(ConversionError, match="must be stored"):  # through a mapping's global options too
        pfa_fx.convert(_mlp(), {"4": rule, "*": "fa"}, store_feedback=False)
    gm = pfa_fx.convert(_mlp(), {"4": rule, "*": ("fa", {"store_feedback": False})})  # per entry: fine
    assert [n.store_feedback for n in _nodes(gm).values()] == [False, False, True]
    assert _nodes(pfa_fx.convert(_mlp(), rule, store_feedback=True))["0"].store_feedback  # what they do anyway


def test_store_feedback_must_be_true_or_false():
    with pytest.raises(ConversionTypeError, match=r"store_feedback must be True .* or False .*got 'no'"):
        pfa_fx.convert(_mlp(), "fa", store_feedback="no")
    with pytest.raises(ConversionTypeError, match="store_feedback must be"):
        pfa_fx.convert(_mlp(), {"*": ("pfa", {"store_feedback": 0})})
    with pytest.raises(ConversionError, match="unknown option 'store_feedback' for rule"):
        pfa_fx.convert(_mlp(), "bp", store_feedback=False)  # as any option BP does not take
    gm = pfa_fx.convert(_mlp(), {"0": "bp", "*": "fa"}, store_feedback=False)  # BP ops ignore it, as expansion
    assert [n.store_feedback for n in _nodes(gm).values()] == [True, False, False]


# ------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("case", ["fa", "sf-frsf", "pfa-sparse"])
def test_checkpoints_load_across_store_feedback_under_the_same_seed(case):
    rule, opts = CASES[case]
    stored, unstored = _pair("cnn", rule, opts)
    _assert_same_training(stored, unstored, NETS["cnn"][1], steps=1)  # R has moved: a real resume
    fresh_unstored = pfa_fx.convert(_cnn(), rule, seed=3, store_feedback=False, **opts)
    fresh_unstored.load_state_dict(stored.state_dict())  # B checked against the redraw, then dropped
    fresh_stored = pfa_fx.convert(_cnn(), rule, seed=3, **opts)
    fresh_stored.load_state_dict(unstored.state_dict())  # keeps its own B: the same draw
    _assert_same_training(stored, fresh_unstored, NETS["cnn"][1], steps=2)  # each resumes the other's run
    _assert_same_training(fresh_stored, unstored, NETS["cnn"][1], steps=2)


def test_checkpoints_across_store_feedback_refuse_another_seed_or_another_b():
    stored = pfa_fx.convert(_cnn(), "fa", seed=3)
    unstored = pfa_fx.convert(_cnn(), "fa", seed=4, store_feedback=False)
    with pytest.raises(ConversionError, match="seed"):
        unstored.load_state_dict(stored.state_dict())
    with pytest.raises(ConversionError, match="seed"):
        pfa_fx.convert(_cnn(), "fa", seed=3).load_state_dict(unstored.state_dict())
    tampered = stored.state_dict()
    tampered["pfa_feedback.conv.B"] = tampered["pfa_feedback.conv.B"] * 2
    with pytest.raises(ConversionError, match=r"op 'conv' .* holds a different B"):
        pfa_fx.convert(_cnn(), "fa", seed=3, store_feedback=False).load_state_dict(tampered)


def test_checkpoints_without_their_conversion_record_load_only_a_b_that_is_the_redraw():
    stored = pfa_fx.convert(_cnn(), "fa", seed=3)
    unstored = pfa_fx.convert(_cnn(), "fa", seed=3, store_feedback=False)
    unstored.load_state_dict(dict(stored.state_dict()))  # dict(): no _metadata, B checked all the same
    # holding no feedback tensors, it reads as a model's own weights: PyTorch's strict load wants B
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "pfa_feedback.conv.B"'):
        pfa_fx.convert(_cnn(), "fa", seed=3).load_state_dict(dict(unstored.state_dict()))


def test_report_says_which_ops_redraw_their_feedback():
    text = str(pfa_fx.report(pfa_fx.convert(_mlp(), "fa", store_feedback=False)))
    assert "3 op(s) hold no fixed random feedback (store_feedback=False)" in text
    assert "store_feedback" not in str(pfa_fx.report(pfa_fx.convert(_mlp(), "fa")))
