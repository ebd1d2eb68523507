"""A fast subset of the Hugging Face coverage sweep (benchmarks/hf_coverage.py) as tests: a
causal LM, a masked LM and an image classifier, each built from a small config, converted
through torch.export and checked exactly as the sweep checks them; a Mixture-of-Experts model
whose expert banks (transformers' grouped_mm) are converted too (slow); the sweep's
own detector of matrix products the audit does not list; and its bookkeeping (timeout row,
summary from the CSV)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from benchmarks import hf_coverage  # after the importorskip


def _assert_clean(row: dict) -> None:
    assert row["status"] == hf_coverage.Status.PASS, f"{row['model']} [{row['rule']}] {row['status']}: {row['reason']}"
    assert row["eval_equal"] is True and row["train_equal"] is True
    assert row["left_on_bp"] == 0 and row["unlisted_on_bp"] == ""
    assert row["grads_finite"] is True and row["step_ok"] is True
    assert row["ops_converted"] >= 1 and row["front_end"] == f"{row['ops_converted']} export graph"


def test_gpt2_converts_through_export_and_bp_reproduces_the_native_gradients():
    rows = list(hf_coverage.check_spec("gpt2", ["fa", "bp"]))
    for row in rows:
        _assert_clean(row)
    bp = rows[1]
    assert bp["grad_rel_diff"] <= 1e-5, bp["grad_max_diff"]


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_encoder_and_image_classifier_are_clean_under_fa(name):
    (row,) = hf_coverage.check_spec(name, ["fa"])
    _assert_clean(row)


@pytest.mark.slow  # 12 s; the sweep runs it too
def test_mixtral_expert_banks_are_converted():
    (row,) = hf_coverage.check_spec("mixtral", ["fa"])
    _assert_clean(row)


class _OpaqueMatmul(torch.autograd.Function):
    """A matrix product whose backward autograd names ``_OpaqueMatmulBackward``: not one of
    the standard ops weights_on_backprop lists."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.T

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def test_the_sweep_sees_weights_behind_products_the_audit_does_not_list():
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(3, 4))
    x = torch.randn(2, 4, requires_grad=True)
    out = _OpaqueMatmul.apply(x, model.w[:, :].T.T).sum()
    assert hf_coverage.unlisted_products(out, model) == ["w (_OpaqueMatmulBackward)"]
    assert hf_coverage.unlisted_products((x @ model.w.T).sum(), model) == []  # a listed op: the audit's job


def test_sweep_records_a_timeout_and_writes_the_summary_from_the_csv(tmp_path: Path):
    csv_path, md = tmp_path / "hf.csv", tmp_path / "HF.md"
    args = ["--models", "vit", "--rules", "fa", "--csv", str(csv_path), "--summary", str(md)]
    hf_coverage.main([*args, "--timeout", "0.01"])
    (row,) = hf_coverage.ran_rows(csv_path)
    assert (row["model"], row["model_type"], row["head"], row["status"]) == ("vit", "vit", "image-cls", "timeout")
    text = md.read_text()
    assert "**1 model types (1 models with their heads): 0 of 1 clean under FA (0.0 %).**" in text
    assert "### vit (vit, image-cls): timeout under fa" in text
    md.unlink()
    hf_coverage.main(["--no-run", "--csv", str(csv_path), "--summary", str(md)])
    assert "| vit | vit | image-cls |" in md.read_text()


def test_every_head_has_inputs_and_the_sweep_spans_thirty_model_types():
    assert len({s.model_type for s in hf_coverage.SPECS}) >= 30
    assert set(hf_coverage.QUICK) <= {s.name for s in hf_coverage.SPECS}
    assert {s.name for s in hf_coverage.select(["gpt*"])} == {"gpt2", "gpt_bigcode", "gptj", "gpt_neox"}
