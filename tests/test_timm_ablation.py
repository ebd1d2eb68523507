"""benchmarks/timm_ablation.py runs end to end (--smoke) and writes what it promises."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "timm_ablation.py"


def _load():
    for dep in ("matplotlib", "tqdm", "mlxtend"):
        pytest.importorskip(dep)
    spec = importlib.util.spec_from_file_location("benchmarks_timm_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_ablation_smoke_writes_table(tmp_path):
    ablation = _load()
    md = tmp_path / "ABLATION.md"
    rows = ablation.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--md", str(md)])

    for name in ("ablation.csv", "ablation_layers.csv", "ablation.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (tmp_path / "ablation.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["model"], r["rule"]) for r in table] == [(r["model"], r["rule"]) for r in rows]
    assert {r["rule"] for r in table} == set(ablation.SMOKE_RULES)
    assert len({r["model"] for r in table}) == len(ablation.SMOKE_MODELS)

    for r in rows:
        assert r["steps"] == 3 and r["diverged_at"] == ""
        assert 0.0 <= r["acc"] <= 1.0
        assert r["head_grad_angle"] == pytest.approx(0.0, abs=1e-2)  # the classifier's error is exact
        assert r["n_grad_layers"] == r["n_ops"] - 1
        if r["rule"] == "bp":  # the BP rule is BP: same gradients, W_b = W
            assert r["grad_angle"] == pytest.approx(0.0, abs=1e-2)
            assert r["path_angle"] == pytest.approx(0.0, abs=1e-2)
            assert r["time_x_bp"] == 1.0
        else:  # random feedback at init: far from BP
            assert r["grad_angle_init"] > 45.0
            assert r["path_angle_init"] > 45.0

    text = md.read_text()
    assert "| model | bp | pfa |" in text
    assert "python benchmarks/timm_ablation.py --smoke" in text
    assert "![ablation](ablation.png)" in text
