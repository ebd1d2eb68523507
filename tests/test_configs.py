"""Typed rule configs: one frozen dataclass per rule, checked when built, the same
conversion as the string shorthand, presets, and the version checkpoints record."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pfa_fx
from pfa_fx import ConversionError
from tests.nets import MLP, Mixed

CONFIGS = {
    "bp": pfa_fx.BP,
    "fa": pfa_fx.FA,
    "dfa": pfa_fx.DFA,
    "sf": pfa_fx.SF,
    "kp": pfa_fx.KP,
    "wm": pfa_fx.WM,
    "pal": pfa_fx.PAL,
    "pfa": pfa_fx.PFA,
    "pfa-o": pfa_fx.PFAO,
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if pfa_fx.is_feedback_path(k) and isinstance(v, torch.Tensor)}


def test_every_rule_has_an_exported_config_whose_defaults_are_the_nodes_options():
    assert set(CONFIGS) == set(pfa_fx.RULES)
    for name, cfg in CONFIGS.items():
        assert cfg.rule == name
        assert pfa_fx.RULES[name].config_type is cfg
        assert pfa_fx.RULES[name].options == cfg().options()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: pfa_fx.PFA(expansion=0), r"expansion must be > 0"),
        (lambda: pfa_fx.PFA(expansion="10"), r"expansion must be a number"),
        (lambda: pfa_fx.PFA(implicit=True), r"implicit=True .*compact=True"),
        (lambda: pfa_fx.PFA(compact=True, expansion=0.5), r"compact=True needs expansion >= 1"),
        (lambda: pfa_fx.PFA(route="fast"), r"valid routes: auto, product, population"),
        (lambda: pfa_fx.PFA(density=0), r"density must be a number in \(0, 1\]"),
        (lambda: pfa_fx.PFAO(expansion=0.5), r"expansion must be >= 1"),
        (lambda: pfa_fx.PFAO(density=0.5), r"density must be 1\.0"),
        (lambda: pfa_fx.FA(scale="he"), r"valid scales: xavier, weight or a positive number"),
        (lambda: pfa_fx.FA(scale=-1.0), r"scale must be"),
        (lambda: pfa_fx.FA(store_feedback="no"), r"store_feedback must be True"),
        (lambda: pfa_fx.SF(variant="xsf"), r"valid variants: usf, frsf, brsf"),
        (lambda: pfa_fx.DFA(scale="weight"), r"valid scales: xavier or a positive number"),
        (lambda: pfa_fx.DFA(form="per-token"), r"valid forms: auto, token, dense"),
        (lambda: pfa_fx.KP(implicit=1), r"implicit must be True or False"),
        (lambda: pfa_fx.WM(sigma=0), r"sigma must be a positive number"),
        (lambda: pfa_fx.WM(mirror_batch=0), r"mirror_batch must be an int >= 1"),
        (lambda: pfa_fx.PAL(feedback_lr=-1), r"feedback_lr must be a positive number or None"),
        (
            lambda: pfa_fx.PFA(expanson=2),
            r"unknown option 'expanson' for rule 'pfa'; valid options: expansion, .*did you mean 'expansion'",
        ),
        (
            lambda: pfa_fx.KP(store_feedback=True),
            r"unknown option 'store_feedback' for rule 'kp'; valid options: scale, implicit",
        ),
        (lambda: pfa_fx.PFA(2), r"takes options by keyword only"),
    ],
)
def test_an_invalid_config_fails_at_construction_naming_the_valid_values(make, match):
    with pytest.raises(ConversionError, match=match):
        make()


def test_configs_are_frozen_hashable_and_replace_validates():
    cfg = pfa_fx.PFA(expansion=2, compact=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.expansion = 3  # type: ignore[misc]
    assert {cfg: 1}[pfa_fx.PFA(expansion=2, compact=True)] == 1
    assert cfg.replace(expansion=4).expansion == 4 and cfg.expansion == 2
    with pytest.raises(ConversionError, match="expansion must be > 0"):
        cfg.replace(expansion=-1)


def test_learned_rules_take_store_feedback_true_from_options_and_refuse_false():
    assert pfa_fx.KP.from_options({"store_feedback": True}) == pfa_fx.KP()
    with pytest.raises(ConversionError, match="must be stored"):
        pfa_fx.WM.from_options({"store_feedback": False})


@pytest.mark.parametrize(
    ("config", "name", "options"),
    [
        (pfa_fx.PFA(expansion=2, compact=True), "pfa", {"expansion": 2, "compact": True}),
        (pfa_fx.FA(scale="xavier", store_feedback=False), "fa", {"scale": "xavier", "store_feedback": False}),
        (pfa_fx.SF(variant="frsf"), "sf", {"variant": "frsf"}),
        (pfa_fx.KP(implicit=True), "kp", {"implicit": True}),
        (pfa_fx.PFAO(expansion=3), "pfa-o", {"expansion": 3}),
    ],
)
def test_a_config_converts_exactly_as_its_string_shorthand(config, name, options):
    torch.manual_seed(0)
    net = Mixed()
    typed = pfa_fx.convert(net, config, seed=3)
    shorthand = pfa_fx.convert(net, name, seed=3, **options)
    mapped = pfa_fx.convert(net, {"*": (name, options)}, seed=3)
    assert pfa_fx.conversion_config(typed) == pfa_fx.conversion_config(shorthand) == pfa_fx.conversion_config(mapped)
    ref = _state(shorthand)
    for model in (typed, mapped):
        got = _state(model)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    for node in (n for _, n in pfa_fx.feedback_modules(typed)):
        assert node.rule_config == config


def test_rule_mappings_take_configs_and_convert_level_options_apply_only_to_names():
    net = MLP()
    model = pfa_fx.convert(net, {"0": pfa_fx.PFA(expansion=2), "*": "fa"}, scale="xavier")
    nodes = dict(pfa_fx.feedback_modules(model))
    assert nodes["0"].config["expansion"] == 2 and nodes["0"].config["scale"] == "weight"  # the config's own
    assert {k: n.rule for k, n in nodes.items()} == {"0": "pfa", "2": "fa", "4": "fa"}
    assert all(n.config["scale"] == "xavier" for k, n in nodes.items() if k != "0")


def test_options_given_beside_a_config_are_refused_pointing_into_the_config():
    with pytest.raises(
        ConversionError, match=r"PFA holds its rule's options: give them to it \(e\.g\. PFA\(expansion=\.\.\.\)"
    ):
        pfa_fx.convert(MLP(), pfa_fx.PFA(), expansion=2)


def test_a_misspelt_convert_keyword_is_pointed_at_convert():
    with pytest.raises(
        ConversionError, match=r"unknown option 'captur'.*did you mean 'capture' \(a keyword of pfa_fx\.convert"
    ):
        pfa_fx.convert(MLP(), "fa", captur="modules")


def test_presets_are_library_configs_and_a_preset_name_as_rule_points_to_them():
    assert pfa_fx.PRESETS["pfa-compact"] == pfa_fx.PFA(compact=True)
    assert pfa_fx.PRESETS["kp-implicit"] == pfa_fx.KP(implicit=True)
    model = pfa_fx.convert(MLP(), pfa_fx.PRESETS["pfa-compact"])
    assert all(n.compact for _, n in pfa_fx.feedback_modules(model))
    with pytest.raises(ConversionError, match=r"'pfa-compact' is a preset: pass pfa_fx\.PRESETS\['pfa-compact'\]"):
        pfa_fx.convert(MLP(), "pfa-compact")


def test_checkpoints_record_the_config_version_and_older_records_without_it_load():
    net = MLP()
    model = pfa_fx.convert(net, pfa_fx.PFA(expansion=2))
    sd = model.state_dict()
    assert sd._metadata[""]["pfa_fx"]["versions"] == {"pfa": pfa_fx.PFA.VERSION}
    del sd._metadata[""]["pfa_fx"]["versions"]  # as an older pfa_fx saved it
    again = pfa_fx.convert(net, "pfa", expansion=2)
    again.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(_state(again).values(), _state(model).values()))
