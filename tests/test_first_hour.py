"""A user's first hour: mapping mistakes caught with the nearest op names, the
report showing options and state size, checkpoints that know their conversion, feedback
state told apart from the model's parameters, metrics that restore the model's mode, and
one error class for every bad rule or option."""

from __future__ import annotations

import copy
import io
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pfa_fx
from pfa_fx.errors import ConversionError, ConversionTypeError
from tests.nets import MLP

DT = torch.float64


class Net(nn.Module):
    """A stem, a two-layer stage and a head: op names ``stem``, ``layer4.0``, ``layer4.2``, ``fc``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.layer4 = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.layer4(torch.relu(self.stem(x)))))


def _nodes(gm):
    return dict(pfa_fx.feedback_modules(gm))


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


# ------------------------------------------------------------- 1. mapping mistakes
def test_a_mapping_entry_that_matches_no_op_warns_and_strict_raises():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    gm, messages = _warnings_of(lambda: pfa_fx.convert(model, rule={"fc*": "pfa"}))
    assert list(_nodes(gm)) == []
    assert len(messages) == 1 and "'fc*' matches no op" in messages[0] and "op names here: 0, 2" in messages[0]
    with pytest.raises(ConversionError, match=r"(?s)strict=True.*'fc\*' matches no op"):
        pfa_fx.convert(model, rule={"fc*": "pfa"}, strict=True)


def test_a_module_name_given_for_its_ops_suggests_the_pattern():
    _, messages = _warnings_of(lambda: pfa_fx.convert(Net(), rule={"layer4": "pfa"}))
    assert any("'layer4' matches no op; did you mean 'layer4.*'?" in m for m in messages), messages
    _, messages = _warnings_of(lambda: pfa_fx.convert(Net(), rule={"Layer4.*": "pfa"}))
    assert any("did you mean 'layer4.*'?" in m for m in messages), messages


def test_a_nonexistent_entry_before_a_catch_all_warns_and_strict_raises():
    gm, messages = _warnings_of(lambda: pfa_fx.convert(Net(), rule={"stem2.*": "bp", "*": "pfa"}))
    assert {n.rule for n in _nodes(gm).values()} == {"pfa"}
    assert any("'stem2.*' matches no op" in m for m in messages), messages
    with pytest.raises(ConversionError, match=r"'stem2\.\*' matches no op"):
        pfa_fx.convert(Net(), rule={"stem2.*": "bp", "*": "pfa"}, strict=True)


def test_an_entry_shadowed_by_an_earlier_one_warns():
    gm, messages = _warnings_of(lambda: pfa_fx.convert(Net(), rule={"*": "pfa", "fc": "bp"}))
    assert _nodes(gm)["fc"].rule == "pfa"
    assert any("'fc' decides no op" in m and "taken by the earlier entry '*'" in m for m in messages), messages


def test_a_module_type_entry_that_matches_no_op_warns():
    _, messages = _warnings_of(lambda: pfa_fx.convert(Net(), rule={nn.Conv2d: "fa", "*": "pfa"}))
    assert any("Conv2d matches no op" in m and "Linear" in m for m in messages), messages


def test_a_mapping_whose_entries_all_decide_ops_converts_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = pfa_fx.convert(Net(), rule={"stem": "bp", "layer4.*": ("pfa", {"expansion": 2}), "fc": None}, strict=True)
    assert {k: n.rule for k, n in _nodes(gm).items()} == {"stem": "bp", "layer4.0": "pfa", "layer4.2": "pfa"}


def test_op_names_lists_what_convert_names_without_converting():
    model = Net()
    before = copy.deepcopy(model.state_dict())
    names = pfa_fx.op_names(model)
    assert names == ["stem", "layer4.0", "layer4.2", "fc"]
    assert set(names) == set(_nodes(pfa_fx.convert(model, "fa")))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, pfa_fx.FeedbackNode) for m in model.modules())


# ---------------------------------------------------------------------- 2. report
def test_report_prints_each_ops_options_and_the_feedback_state_size():
    gm = pfa_fx.convert(Net(), "pfa", expansion=2)
    rep = pfa_fx.report(gm)
    text = str(rep)
    assert all(op.options == {**op.options, "expansion": 2, "compact": False} for op in rep.ops)
    assert "expansion=2 compact=False" in text
    held = sum(t.numel() for n in _nodes(gm).values() for t in [*n.parameters(), *n.buffers()])
    assert rep.state_numel == held and f"feedback state: {held} numbers" in text
    assert "compact=False (the default) hold R" in text and "compact=True would hold" in text


# ------------------------------------------------------------------ 3. checkpoints
def _round_trip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf)


def test_a_checkpoint_of_other_options_is_refused_naming_both_configurations():
    net = Net()
    saved = _round_trip(pfa_fx.convert(net, "pfa", expansion=2).state_dict())
    other = pfa_fx.convert(net, "pfa", expansion=2, compact=True)
    with pytest.raises(ConversionError) as err:
        other.load_state_dict(saved)
    text = str(err.value)
    assert "checkpoint: pfa(expansion=2, compact=False" in text and "this model: pfa(expansion=2, compact=True" in text
    assert "stem" in text and "pfa_fx.convert(model, 'pfa', expansion=2, compact=False" in text
    assert "Missing key" not in text
    pfa_fx.convert(net, "pfa", expansion=2).load_state_dict(saved)  # the same configuration loads
    pfa_fx.convert(net, "pfa", expansion=2, route="population").load_state_dict(saved)  # route: same numbers


def test_a_checkpoint_that_would_load_feedback_into_another_rule_is_refused_even_with_strict_false():
    net = Net()
    fa = pfa_fx.convert(net, "fa")
    kp = pfa_fx.convert(net, "kp")  # the same state key, B, with another meaning
    with pytest.raises(ConversionError, match=r"(?s)checkpoint: fa\(scale='weight'\).*this model: kp"):
        kp.load_state_dict(fa.state_dict(), strict=False)
    # nothing of the feedback would load into a BP conversion: strict=False takes the weights
    result = pfa_fx.convert(net, "bp").load_state_dict(fa.state_dict(), strict=False)
    assert result.missing_keys == [] and all(k.startswith("pfa_feedback.") for k in result.unexpected_keys)
    # and an unconverted model's checkpoint (pretrained weights) is not a conversion to check
    assert kp.load_state_dict(net.state_dict(), strict=False).unexpected_keys == []


def test_the_seed_must_match_where_a_rule_keeps_drawing_from_it():
    net = Net()
    with pytest.raises(ConversionError, match="only the seed differs"):
        pfa_fx.convert(net, "wm", seed=2).load_state_dict(pfa_fx.convert(net, "wm", seed=1).state_dict())
    pfa_fx.convert(net, "fa", seed=2).load_state_dict(pfa_fx.convert(net, "fa", seed=1).state_dict())


def test_a_checkpoint_without_the_configuration_is_checked_by_its_keys():
    net = Net()
    saved = dict(pfa_fx.convert(net, "pfa", expansion=2).state_dict())  # a rebuilt dict: no _metadata
    with pytest.raises(ConversionError, match=r"(?s)records no pfa_fx configuration.*stem: checkpoint holds B, R"):
        pfa_fx.convert(net, "pfa", expansion=2, compact=True).load_state_dict(saved)
    pfa_fx.convert(net, "pfa", expansion=2).load_state_dict(saved)  # old checkpoints of the same kind load


def test_the_configuration_is_recorded_and_ops_converted_on_one_side_only_are_named():
    net = Net()
    gm = pfa_fx.convert(net, "pfa", expansion=2, seed=3)
    assert pfa_fx.conversion_config(gm)["fc"] == {
        "rule": "pfa",
        "options": {
            "expansion": 2,
            "compact": False,
            "route": "auto",
            "scale": "weight",
            "density": 1.0,
            "implicit": False,
        },
        "seed": 3,
    }
    assert gm.state_dict()._metadata[""]["pfa_fx"]["ops"] == pfa_fx.conversion_config(gm)
    mapped = pfa_fx.convert(net, {"fc": None, "*": ("pfa", {"expansion": 2})}, seed=3)
    with pytest.raises(ConversionError, match=r"(?s)checkpoint: pfa.*fc.*this model: not converted"):
        mapped.load_state_dict(gm.state_dict())


def test_a_model_converted_without_a_graph_checks_its_checkpoints_too():
    class Eager(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) * float(x.mean() > -1e9)  # float() of a traced value: no graph

    with pytest.warns(UserWarning, match="runs eagerly"):
        a, b = pfa_fx.convert(Eager(), "fa"), pfa_fx.convert(Eager(), "kp")
    with pytest.raises(ConversionError, match="this model: kp"):
        b.load_state_dict(a.state_dict())


# -------------------------------------------------------- 4. feedback parameters
@pytest.mark.parametrize(
    ("rule", "options"),
    [("fa", {}), ("kp", {}), ("pfa", {"expansion": 2}), ("pfa", {"compact": True}), ({"fc": "kp", "*": "pfa"}, {})],
)
def test_feedback_parameters_and_model_parameters_partition_parameters_exactly(rule, options):
    gm = pfa_fx.convert(Net(), rule, **options)
    every = list(gm.parameters())
    feedback, own = pfa_fx.feedback_parameters(gm), pfa_fx.model_parameters(gm)
    assert {id(p) for p in feedback}.isdisjoint(id(p) for p in own)
    assert sorted([*feedback, *own], key=lambda p: [id(q) for q in every].index(id(p))) == every
    assert len(feedback) + len(own) == len(every)
    own_ids = {id(p) for p in own}
    assert {n for n, p in gm.named_parameters() if id(p) in own_ids} == set(dict(Net().named_parameters()))
    node_params = {id(p) for n in _nodes(gm).values() for p in n.parameters()}
    assert {id(p) for p in feedback} == node_params


def _train(compact: bool, clip, steps: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    net = MLP((6, 8, 8, 3)).double()
    gm = pfa_fx.convert(net, "pfa", expansion=3, compact=compact, seed=1)
    opt = torch.optim.SGD(gm.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(16, 6, dtype=DT, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        clip(gm)
        opt.step()
    nodes = _nodes(gm).values()
    return [n.weight.clone() for n in nodes], [n.feedback_weight() for n in nodes]


def test_clip_grad_norm_keeps_compact_pfa_equal_to_explicit_pfa_under_sgd():
    clip = lambda gm: pfa_fx.clip_grad_norm_(gm, 0.05)  # noqa: E731  (small: every step is clipped)
    (w_explicit, b_explicit), (w_compact, b_compact) = _train(False, clip), _train(True, clip)
    for a, b in zip(w_explicit + b_explicit, w_compact + b_compact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # torch's own clipping over model.parameters() counts the feedback gradients in the norm
    torch_clip = lambda gm: torch.nn.utils.clip_grad_norm_(gm.parameters(), 0.05)  # noqa: E731
    (w_explicit, _), (w_compact, _) = _train(False, torch_clip), _train(True, torch_clip)
    assert not all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(w_explicit, w_compact))


def test_clip_grad_norm_takes_its_factor_from_the_models_own_gradients():
    gm = pfa_fx.convert(Net(), "kp")
    F.cross_entropy(gm(torch.randn(8, 6)), torch.arange(8) % 3).backward()
    own = {id(p): p.grad.clone() for p in pfa_fx.model_parameters(gm)}
    fb = {id(p): p.grad.clone() for p in pfa_fx.feedback_parameters(gm)}
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in own.values()]))
    total = pfa_fx.clip_grad_norm_(gm, 1e-3)
    torch.testing.assert_close(total, expected)
    factor = 1e-3 / (expected + 1e-6)
    for p in pfa_fx.model_parameters(gm):
        torch.testing.assert_close(p.grad, own[id(p)] * factor)
    for p in pfa_fx.feedback_parameters(gm):  # the same factor: KP's B still moves by W's step
        torch.testing.assert_close(p.grad, fb[id(p)] * factor)


# --------------------------------------------------------------------- 5. metrics
class Branchy(nn.Module):
    """Returns a tuple in training mode (an auxiliary head), a tensor in eval mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.body(x)))
        if self.training:
            return self.head(h), self.aux(h)
        return self.head(h)


def test_gradient_alignment_restores_every_modules_mode():
    gm = pfa_fx.convert(Branchy(), "fa").train()
    gm.norm.eval()  # a frozen BatchNorm inside a model in training mode
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def closure():
        gm.eval()  # the recommended probe: BatchNorm on running statistics, no dropout
        return F.cross_entropy(gm(x), y)

    angles = pfa_fx.gradient_alignment(gm, closure)
    assert set(angles) == {"body", "head"}
    assert gm.training and not gm.norm.training and gm.head.training
    assert isinstance(gm(x), tuple)  # the training graph is back, not only the flag


def test_gradient_alignment_is_nan_where_no_error_reaches_an_op():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    nn.init.zeros_(net[1].weight)  # as a zero-initialised last BatchNorm of a residual branch
    nn.init.ones_(net[1].bias)  # the layer above still sees (constant) input
    gm = pfa_fx.convert(net, "fa").eval()
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    angles = pfa_fx.gradient_alignment(gm, lambda: F.cross_entropy(gm(x), y))
    assert math.isnan(angles["0"]) and angles["3"] == pytest.approx(0.0, abs=1e-4)


# --------------------------------------------------------- 6. errors and the node
def test_conversion_error_is_one_class_and_a_value_error():
    assert pfa_fx.ConversionError is ConversionError is sys.modules["pfa_fx.convert"].ConversionError
    assert issubclass(ConversionError, ValueError) and issubclass(ConversionTypeError, TypeError)


@pytest.mark.parametrize(
    ("rule", "options", "match"),
    [
        ("pfb", {}, "unknown rule 'pfb'.*did you mean 'pfa'"),
        ({"*": "mirror"}, {}, "unknown rule 'mirror'"),
        ({"*": 3}, {}, "must be a rule name"),
        ("pfa", {"expnasion": 4}, "unknown option 'expnasion'.*did you mean 'expansion'"),
        ("fa", {"scale": "he"}, "unknown scale 'he'"),
        ("kp", {"scale": "wieght"}, "did you mean 'weight'"),
        ("pfa", {"scale": -1.0}, "scale must be"),
        ("sf", {"variant": "frfs"}, "did you mean 'frsf'"),
        ("pfa", {"route": "prodcut"}, "did you mean 'product'"),
        ("pfa", {"expansion": 0}, "expansion must be > 0"),
        ("pfa", {"expansion": "10"}, "expansion must be a number"),
        ("pfa-o", {"expansion": 0.5}, ">= 1"),
        ("pfa", {"density": 0}, "density must be a number"),
        ("pfa-o", {"density": 0.5}, "orthonormalizing"),
        ("wm", {"sigma": 0}, "sigma must be a positive number"),
        ("wm", {"mirror_batch": 0}, "mirror_batch must be an int"),
        ("pal", {"feedback_lr": -1}, "feedback_lr must be a positive number"),
        ("dfa", {"scale": "weight"}, "valid scales: xavier or a positive number"),
        ("fa", {"seed": "1"}, "seed must be an int"),
    ],
)
def test_every_bad_rule_or_option_raises_a_conversion_error(rule, options, match):
    with pytest.raises(ConversionError, match=match):
        pfa_fx.convert(MLP(), rule, **options)


def test_compact_with_a_singular_sparse_g_raises_a_conversion_error():
    with pytest.raises(ConversionError, match="raise density or expansion"):
        pfa_fx.convert(nn.Linear(8, 32), "pfa", expansion=0.5, density=0.5, compact=True)


def test_rule_names_are_case_insensitive():
    gm = pfa_fx.convert(MLP(), "PFA", expansion=2)
    assert {n.rule for n in _nodes(gm).values()} == {"pfa"}
    gm = pfa_fx.convert(MLP(), {"0": "BP", "*": ("Pfa-O", {"expansion": 2})})
    assert [n.rule for n in _nodes(gm).values()] == ["bp", "pfa-o", "pfa-o"]


def test_a_node_reports_the_options_it_was_built_with():
    node = _nodes(pfa_fx.convert(MLP(), "pfa", expansion=2, compact=True, seed=4))["0"]
    assert node.config == {
        "expansion": 2,
        "compact": True,
        "route": "auto",
        "scale": "weight",
        "density": 1.0,
        "implicit": False,
    }
    assert node.options["expansion"] == 10  # the class's defaults stay where they were
    assert node.seed == 4 and node.op_name == "0"
    assert "expansion=2, compact=True" in repr(node)
    wm = _nodes(pfa_fx.convert(MLP(), "wm", sigma=0.5))["0"]
    assert wm.config["sigma"] == 0.5 and wm.config["decay"] == 0.25 and wm.config["mirror_lr"] > 0


def test_the_root_fallback_warning_ends_the_trace_error_before_going_on():
    class NoGraph(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) * float(x.mean() > -1e9)

    with pytest.warns(UserWarning) as caught:
        pfa_fx.convert(NoGraph(), "fa")
    (message,) = [str(w.message) for w in caught if "runs eagerly" in str(w.message)]
    assert ". The whole forward runs eagerly" in message and "' The whole" not in message
