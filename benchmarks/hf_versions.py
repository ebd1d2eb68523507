"""The Hugging Face sample under several transformers releases: one markdown table per
interpreter (each a virtual environment with its own transformers release).

For each of a small Llama, Qwen2 and GPT-NeoX (width 32, 2 layers, 4 heads, vocabulary 256,
float32, weights drawn from a seed) and each of ``fa`` and ``pfa``, the model is converted
with ``pfa_fx.convert(model, rule, example_inputs={"input_ids": ...})`` and checked:

- *front end*: each converted op's ``conversion_path`` (``export graph`` where torch.export
  captured the model), and the number of converted ops;
- *forward*: the converted model's logits ``torch.equal`` to the native model's, in eval
  and in train mode;
- *on BP*: ``pfa_fx.audit.weights_on_backprop`` of the train-mode logits plus the
  parameters convert's warnings say stay on BP (``-`` when none);
- *step*: one ``torch.optim.SGD`` step (lr 0.1) on the next-token loss of a fixed batch:
  the loss before and after, every gradient finite.

Each interpreter runs this file with ``--worker`` and the repository on its ``sys.path``
(pfa_fx need not be installed there); torch comes from that interpreter too. Usage::

    python benchmarks/hf_versions.py /tmp/venv_tf5.20.2/bin/python .venv/bin/python

A row that fails names the stage and the exception's first line; the exit status is 1 when
any row failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODELS = ("llama", "qwen2", "gpt_neox")
RULES = ("fa", "pfa")
VOCAB = 256


def _build(name: str) -> Any:
    import transformers

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **sizes))
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **sizes))
    if name == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(hidden_dropout=0.0, attention_dropout=0.0, **sizes)
        return transformers.GPTNeoXForCausalLM(cfg)
    raise ValueError(name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:160]


def _check(name: str, rule: str) -> dict[str, Any]:
    """One model converted with one rule, checked as the module docstring says."""
    import warnings

    import torch
    import torch.nn.functional as F

    import pfa_fx
    from pfa_fx.audit import weights_on_backprop

    row: dict[str, Any] = {"model": name, "rule": rule}
    stage = "build"
    try:
        torch.manual_seed(0)
        native = _build(name).eval()
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
        stage = "convert"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kwargs = {"expansion": 2} if rule == "pfa" else {}
            model = pfa_fx.convert(native, rule, example_inputs={"input_ids": ids}, **kwargs)
        ops = dict(pfa_fx.feedback_modules(model))
        row["front end"] = ", ".join(sorted({n.conversion_path for n in ops.values()})) or "-"
        row["ops"] = len(ops)
        row["warnings"] = [str(w.message).splitlines()[0][:160] for w in caught if "pfa_fx" in str(w.message)]
        on_bp = {
            line.strip().split(":")[0]
            for w in caught
            if "stay on BP" in str(w.message)
            for line in str(w.message).splitlines()[1:]
        }
        stage = "forward"
        equal = []
        for train in (False, True):
            native.train(train)
            model.train(train)
            with torch.no_grad():
                equal.append(torch.equal(native(input_ids=ids).logits, model(input_ids=ids).logits))
        row["forward equal"] = all(equal)
        stage = "audit"
        on_bp |= set(weights_on_backprop(model(input_ids=ids).logits.sum(), model))
        row["on BP"] = sorted(on_bp)
        stage = "step"
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def loss() -> torch.Tensor:
            logits = model(input_ids=ids).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

        before = loss()
        opt.zero_grad()
        before.backward()
        row["grads finite"] = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
        opt.step()
        with torch.no_grad():
            after = loss()
        row["loss"] = (before.item(), after.item())
        row["ok"] = (
            row["forward equal"]
            and not row["on BP"]
            and row["grads finite"]
            and all(map(math.isfinite, row["loss"]))
            and row["front end"] == "export graph"
        )
    except Exception as exc:
        row["ok"] = False
        row["error"] = f"{stage}: {_first_line(exc)}"
    return row


def worker() -> None:
    """Run in the interpreter under test: print one JSON object with its versions and rows."""
    import platform

    import torch
    import transformers

    torch.set_num_threads(1)
    rows = [_check(m, r) for m in MODELS for r in RULES]
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
    }
    print("HF_VERSIONS_JSON " + json.dumps(info))


def table(info: dict[str, Any]) -> str:
    """A markdown table of one interpreter's rows."""
    lines = [
        f"transformers {info['transformers']} (torch {info['torch']}, Python {info['python']})",
        "",
        "| model | rule | front end | ops | forward equal | on BP | grads finite | loss → after 1 SGD step | ok |",
        "|---|---|---|---:|---|---|---|---|---|",
    ]
    for r in info["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['rule']} | {r.get('front end', '–')} | – | – | – | – | {r['error']} | no |"
            )
            continue
        on_bp = ", ".join(r["on BP"]) or "–"
        loss = f"{r['loss'][0]:.4f} → {r['loss'][1]:.4f}"
        lines.append(
            f"| {r['model']} | {r['rule']} | {r['front end']} | {r['ops']} | {'yes' if r['forward equal'] else 'NO'} "
            f"| {on_bp} | {'yes' if r['grads finite'] else 'NO'} | {loss} | {'yes' if r['ok'] else 'no'} |"
        )
    warned = sorted({w for r in info["rows"] for w in r.get("warnings", [])})
    if warned:
        lines += ["", "Warnings: " + "; ".join(warned)]
    return "\n".join(lines)


def run(python: str, timeout: float) -> dict[str, Any]:
    """Run the worker under ``python``; its JSON, or an error row."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "--worker"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("HF_VERSIONS_JSON "):
            return json.loads(line.split(" ", 1)[1])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"python": python, "torch": "?", "transformers": "?", "rows": [], "error": f"{python}: {tail}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("pythons", nargs="*", default=[sys.executable], help="interpreters to run the sample under")
    p.add_argument("--timeout", type=float, default=900, help="seconds per interpreter")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker()
        return 0
    failed = False
    for python in args.pythons:
        info = run(python, args.timeout)
        if "error" in info:
            print(f"{info['error']}\n")
            failed = True
            continue
        print(table(info) + "\n", flush=True)
        failed |= not all(r["ok"] for r in info["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
