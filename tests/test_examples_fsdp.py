"""examples/fsdp_finetune.py under torchrun (2 gloo processes): a converted HF Llama and a timm
ViT sharded per block train, each rank holds about half of the weights and feedback state,
and a run saved on 2 ranks and resumed on 1 continues as the uninterrupted run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("timm")
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "fsdp_finetune.py"


def _run(nproc: int, *args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(SCRIPT)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([*cmd, "--quick", "--corpus", "pydoc", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _losses(out: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step\s+(\d+)\s+loss\s+([\d.]+)", out)}


def _held(out: str) -> list[tuple[int, int, int, int]]:
    rows = re.findall(r"^\s+\d+\s+([\d,]+)/([\d,]+)\s+([\d,]+)/([\d,]+)", out, re.M)
    return [tuple(int(n.replace(",", "")) for n in row) for row in rows]


@pytest.mark.parametrize("model,rule", [("llama", "pfa"), ("vit", "kp")])
def test_a_converted_model_sharded_per_block_trains_with_half_the_state_per_rank(model, rule):
    out = _run(2, "--model", model, "--rule", rule)
    assert len(_losses(out)) >= 2
    held = _held(out)
    assert len(held) == 2, out
    for w_local, w_total, fb_local, fb_total in held:
        assert fb_total > 0 and w_local <= 0.55 * w_total and fb_local <= 0.55 * fb_total, held


def test_a_run_saved_on_two_ranks_resumes_on_one_as_the_uninterrupted_run(tmp_path):
    whole = _losses(_run(2, "--rule", "kp", "--steps", "4"))
    _run(2, "--rule", "kp", "--steps", "2", "--save", str(tmp_path / "ckpt"))
    resumed = _losses(_run(1, "--rule", "kp", "--steps", "4", "--resume", str(tmp_path / "ckpt")))
    assert 3 in resumed and 0 not in resumed  # it started at step 2
    assert resumed[3] == pytest.approx(whole[3], rel=1e-4)
