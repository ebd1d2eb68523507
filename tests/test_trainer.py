"""Hugging Face ``Trainer`` with its default ``TrainingArguments`` trains a converted model:
the converted forward presents the original signature (``remove_unused_columns=True``
keeps the dataset's columns), ``pfa_fx.hf.exact_clipping`` makes the default
``max_grad_norm=1.0`` clip by the model's own gradient norm with the same factor on the
feedback gradients, and fa, kp and pfa learn a small Llama's task under Trainer."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from torch import nn

import pfa_fx

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

VOCAB, SEQ, ITEMS, PERIOD = 64, 32, 16, 8


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def _data() -> list[dict[str, torch.Tensor]]:
    """A repeating pattern of PERIOD tokens at every offset: learnable in a few dozen steps."""
    pattern = torch.randint(1, VOCAB, (PERIOD,), generator=torch.Generator().manual_seed(1))
    rows = [pattern[(torch.arange(SEQ) + i) % PERIOD] for i in range(ITEMS)]
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def _trainer(model: nn.Module, out, steps: int, batch: int = 8, callbacks=(), **options):
    # defaults but for speed: steps, batch, a learning rate that learns in a few dozen steps, no I/O
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=3e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        **options,
    )
    assert args.remove_unused_columns and args.max_grad_norm == 1.0  # the defaults this module is about
    return transformers.Trainer(model=model, args=args, train_dataset=_data(), callbacks=list(callbacks))


def _loss(model: nn.Module) -> float:
    ids = torch.stack([row["input_ids"] for row in _data()])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def _train(model: nn.Module, out) -> float:
    """How far Trainer takes the loss down in 30 steps."""
    before = _loss(model)
    pfa_fx.hf.exact_clipping(_trainer(model, out, steps=30)).train()
    return before - _loss(model)


@pytest.fixture(scope="module")
def bp_drop(tmp_path_factory) -> float:
    return _train(_llama(), tmp_path_factory.mktemp("bp"))


@pytest.mark.parametrize("rule", ["fa", "kp", "pfa"])
def test_trainer_with_default_arguments_trains_a_converted_llama(rule, bp_drop, tmp_path):
    native = _llama()
    converted = pfa_fx.convert(native, rule)
    assert inspect.signature(converted.forward) == inspect.signature(native.forward)
    drop = _train(converted, tmp_path)
    assert bp_drop > 1.0
    assert drop >= bp_drop / 3, (rule, drop, bp_drop)


@pytest.mark.parametrize("capture", ["eager", "modules"])
def test_other_front_ends_present_the_original_signature(capture):
    native = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capture='modules' names matrix parameters it leaves on BP
        converted = pfa_fx.convert(native, "fa", capture=capture)
    assert inspect.signature(converted.forward) == inspect.signature(native.forward)


class _Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, *extra: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor:
        return self.fc(x) * scale


def test_fx_front_end_takes_the_original_names_and_presents_the_signature():
    native = _Keywords()
    converted = pfa_fx.convert(native, "fa")
    assert isinstance(converted, pfa_fx.ConvertedModule)
    assert inspect.signature(converted.forward) == inspect.signature(native.forward)
    x = torch.randn(2, 4)
    # torch.fx named the arguments traced at their defaults labels_1 and scale_1, refusing labels=
    torch.testing.assert_close(converted(x, labels=None, scale=1.0), native(x))
    torch.testing.assert_close(converted(x, None, x, x), native(x))  # *extra, then scale by keyword only
    converted.eval()  # the eval graph's forward is compiled anew
    assert inspect.signature(converted.forward) == inspect.signature(native.forward)
    assert inspect.signature(copy.deepcopy(converted).forward) == inspect.signature(native.forward)


class _Grads(transformers.TrainerCallback):
    """The gradients the optimizer steps with: after Trainer's clipping."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _trainer_step(model: nn.Module, out, exact: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """One Trainer step over the whole data set as one batch: (logged grad_norm, clipped grads)."""
    grads = _Grads()
    trainer = _trainer(model, out, steps=1, batch=ITEMS, callbacks=[grads])
    if exact:
        assert pfa_fx.hf.exact_clipping(trainer) is trainer
        clip = trainer.accelerator.clip_grad_norm_
        pfa_fx.hf.exact_clipping(trainer)
        assert trainer.accelerator.clip_grad_norm_ is clip  # replaced once
        trainer.create_accelerator_and_postprocess()  # as hyperparameter search does: covered too
        assert trainer.accelerator.clip_grad_norm_ is not clip
    trainer.train()
    (logged,) = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return logged, grads.grads


@pytest.mark.parametrize("rule", ["kp", "pfa"])
def test_trainer_clips_by_the_models_own_gradient_norm(rule, tmp_path):
    converted = pfa_fx.convert(_llama(), rule)
    assert pfa_fx.feedback_parameters(converted)
    # the reference: one backward over the same batch, clipped as pfa_fx.clip_grad_norm_ does
    ref = copy.deepcopy(converted).train()
    ids = torch.stack([row["input_ids"] for row in _data()])
    ref(input_ids=ids, labels=ids).loss.backward()
    everything = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters() if p.grad is not None])
    own = torch.nn.utils.clip_grad_norm_(pfa_fx.model_parameters(ref), float("inf"))  # native, own weights only
    assert own > 1.5 and everything > 1.1 * own  # clipping is on, and counting feedback would change it
    pfa_fx.clip_grad_norm_(ref, 1.0)
    expected = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}

    logged, clipped = _trainer_step(copy.deepcopy(converted), tmp_path / "exact", exact=True)
    assert logged == pytest.approx(own.item(), rel=1e-4)
    assert clipped.keys() == expected.keys()
    for name, grad in expected.items():  # model weights and feedback state alike
        torch.testing.assert_close(clipped[name], grad, rtol=1e-4, atol=1e-7, msg=name)

    # without it, Trainer's clip_grad_norm_ counts the feedback gradients in its norm
    logged, _ = _trainer_step(copy.deepcopy(converted), tmp_path / "default", exact=False)
    assert logged == pytest.approx(everything.item(), rel=1e-4)


def test_mixed_precision_unwrapping_keeps_the_converted_forward(tmp_path):
    """accelerate's autocast wrapper, unwrapped along ``__wrapped__``, must end on the
    converted forward, not on the class's unconverted one."""
    from accelerate.utils import extract_model_from_parallel

    native = _llama()
    converted = pfa_fx.convert(native, "fa")
    forward = converted.forward.__func__
    _trainer(converted, tmp_path, steps=1, bf16=True).train()
    unwrapped = extract_model_from_parallel(converted, keep_fp32_wrapper=False)
    assert unwrapped.forward.__func__ is forward
    assert inspect.signature(unwrapped.forward) == inspect.signature(native.forward)
