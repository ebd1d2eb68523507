"""examples/lm_rules.py: the byte-level Llama runs every rule end to end (--quick) on a tiny
real corpus and writes what it promises; a bad rule name is a clear error."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

import pfa_fx

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load() -> ModuleType:
    for dep in ("matplotlib", "tqdm"):
        pytest.importorskip(dep)
    spec = importlib.util.spec_from_file_location("examples_lm_rules", EXAMPLES / "lm_rules.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tiny_corpus(folder: Path) -> Path:
    """Real text that ships with every CPython (pydoc's topics), as one plain and one gzipped file."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    folder.mkdir()
    half = len(text) // 2
    (folder / "a.txt").write_text(text[:half], encoding="utf-8")
    (folder / "b.txt.gz").write_bytes(gzip.compress(text[half:].encode()))
    return folder


def test_quick_run_trains_every_rule_and_writes_outputs(tmp_path):
    lm = _load()
    out = tmp_path / "out"
    summary = lm.main(["--quick", "--no-progress", "--data", str(_tiny_corpus(tmp_path / "corpus")), "--out", str(out)])

    for name in ("curves.csv", "summary.json", "lm_rules.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "lm_rules.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(2 files)" in summary["corpus"]["source"]
    assert summary["coverage"].startswith("15 matmul weights converted")  # 2 layers x 7 + lm_head

    with (out / "curves.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["rule", "step", "metric", "layer", "value"]
    rules = [r for r in lm.RULE_ORDER if r in pfa_fx.RULES]
    assert list(summary["rules"]) == rules
    assert {r["rule"] for r in rows} == set(rules)
    for rule in rules:
        mine = [r for r in rows if r["rule"] == rule]
        losses = [float(r["value"]) for r in mine if r["metric"] in ("eval_loss", "train_loss")]
        assert losses and all(math.isfinite(v) for v in losses), rule
        assert {r["step"] for r in mine if r["metric"] == "eval_bpb"} == {"0", "3", "6"}, rule
        assert math.isfinite(summary["rules"][rule]["final_bpb"]), rule
        assert summary["rules"][rule]["tokens_per_s"] > 0, rule
        assert any(r["metric"] == "grad_angle_deg" for r in mine), rule
        # DFA has no W-shaped feedback weight: no feedback angle, only its updates' angle to BP's
        assert any(r["metric"] == "angle_deg" for r in mine) == (rule != "dfa"), rule

    bp = [r for r in rows if r["rule"] == "bp"]
    assert all(abs(float(r["value"])) < 0.5 for r in bp if r["metric"] in ("grad_angle_deg", "angle_deg"))
    assert summary["rules"]["bp"]["tokens_per_s_ratio_to_bp"] == pytest.approx(1.0)
    fa_hidden = [float(r["value"]) for r in rows if r["rule"] == "fa" and r["metric"] == "grad_angle_deg"]
    assert max(fa_hidden) > 10  # a rule other than BP does not follow BP's gradient


def test_unknown_rule_is_a_clear_error(capsys):
    lm = _load()
    with pytest.raises(SystemExit) as exc:
        lm.parse_args(["--rules", "bp", "pfa-x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'pfa-x'" in err and "pfa-o" in err


def test_quick_finetune_pretrains_saves_reloads_and_tunes_each_start(tmp_path):
    """examples/lm_finetune.py: pretrain with BP, save_pretrained, from_pretrained, then each
    rule fine-tunes; the plastic rules also from an aligned start (pfa_fx.mirror)."""
    _load()
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location("examples_lm_finetune", EXAMPLES / "lm_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    corpus = _tiny_corpus(tmp_path / "books")
    out = tmp_path / "ft"
    summary = module.main(["--quick", "--rules", "bp", "fa", "kp", "--pretrain-data", str(corpus), "--out", str(out)])
    assert (out / "pretrained" / "bp" / "config.json").is_file() and (out / "finetune.png").is_file()
    rows = summary["rows"]
    assert set(rows) == {"bp", "fa", "kp (unaligned)", "kp (aligned)"}
    # every rule starts from the same pretrained model: the same held-out number before tuning
    assert len({round(r["bpb_before"], 9) for r in rows.values()}) == 1
    assert all(math.isfinite(r["final_bpb"]) for r in rows.values())
    # the aligned start is aligned, the unaligned one is not
    assert rows["kp (aligned)"]["angle_deg_start"] < 45 < rows["kp (unaligned)"]["angle_deg_start"]


def test_quick_mixtral_converts_the_expert_banks_and_reports_their_angles(tmp_path):
    lm = _load()
    argv = ["--quick", "--no-progress", "--model", "mixtral", "--rules", "bp", "fa", "dfa", "pfa"]
    summary = lm.main([*argv, "--data", str(_tiny_corpus(tmp_path / "corpus")), "--out", str(tmp_path / "out")])
    # 2 layers x (q, k, v, o, router, gate_up and down expert banks) + lm_head; only the embedding on BP
    assert summary["coverage"].startswith("15 matmul weights converted")
    assert "left on BP: model.embed_tokens.weight" in summary["coverage"]
    rules = summary["rules"]
    assert all(math.isfinite(r["final_bpb"]) for r in rules.values())
    assert rules["bp"]["angle_deg_experts"] == pytest.approx(0.0, abs=0.5)
    assert rules["fa"]["angle_deg_experts"] > 45 and rules["pfa"]["angle_deg_experts"] is not None
    assert rules["dfa"]["angle_deg_experts"] is None  # no W-shaped feedback
    assert "∠W_b experts" in lm.format_table(summary)
