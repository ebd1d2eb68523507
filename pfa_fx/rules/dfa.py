"""Direct feedback alignment (Nøkland 2016; at scale: Launay et al. 2020).

Every weight op's input gradient is a fixed random projection of the *model's output
error* ``e = dloss/dy_out`` instead of ``L_W^T`` of the op's own error:
``grad_x = P_k(e)``, reshaped to the op input's shape. ``grad_W`` (and ``grad_b``) stay
BP's for whatever error reaches the op, so in an MLP the hidden layer ``h_l = f(a_l)``
read by op ``l+1`` gets ``δa_l = (P_{l+1} e) ⊙ f'(a_l)`` — Nøkland's equations — and the
top op, whose output error is ``e`` itself, trains on its true error.

The output error is captured by a forward hook on the converted model (:meth:`DFANode.attach`):
it wraps the model's *main output* in an identity whose backward runs before any op's
(it is the last node of the graph) and hands ``e`` to every DFA op of the model. The main
output is the output itself, the first tensor of a tuple/list (torchvision's
GoogLeNet/Inception aux-logit tuples) that is not a scalar, or, for a dict, the ``"logits"``
/ ``"out"`` entry or else the first such tensor; ``pfa_fx.report`` says which was used.
Losses must come from that output (an auxiliary loss alone gives the ops no output error
and raises). A loss the model computes itself from it — Hugging Face's ``labels=``, whose
output holds ``loss`` next to ``logits`` (a dict's ``"loss"`` entry, or a scalar in a tuple
next to the main output) — cannot run through a wrapper added after the forward: the error
is then caught by a hook on the main output tensor itself, which receives the whole
gradient reaching it (the model's loss and any loss computed from the returned logits)
before the op that made it runs its backward.

Sequences: ``form`` chooses what each op's projection maps. ``"dense"``: the sample's
whole output error onto the op's whole input, as above — for a language model's ``(batch,
T, V)`` output and an op input ``(batch, T, d)``, a ``(T·V) x (T·d)`` projection per op.
``"token"`` (Launay et al., NeurIPS 2020): each position's error onto that position's units,
``grad_x[b, t] = e[b, t] @ P_k`` with one ``(V, d)`` projection per op shared by all positions
(``P_k = node.projection(V, d)``, Launay et al.'s ``B_k = P_kᵀ``; the matrix the dense form
draws for ``T = 1``, so both forms agree on one-token sequences). It applies to linear ops (``F.linear``, ``x @ P``:
features on the last axis) whose input is ``(batch, T, ...)``, or sequence-first ``(T,
batch, ...)`` as inside ``nn.MultiheadAttention``, for an output ``(batch, T, ...)`` of rank
3 or more (trailing axes are flattened: ``V`` and ``d`` are their products); ``"token"``
raises for any other op. ``"auto"`` (default) takes the token form where it applies and the
dense form elsewhere, so classifiers (rank-2 outputs) and convolutions keep the dense form;
so does an input flattened to ``(T·batch, d)`` (``nn.MultiheadAttention``'s ``out_proj``),
whose order of positions and samples cannot be told from its shape, and whose dense
projection grows with ``T²``: for long sequences map such ops to another rule.
Each op's choice is made in the backward from the shapes it sees (:attr:`DFANode.last_form`
records it; ``pfa_fx.report`` counts them). One projection per op, not TinyDFA's single
matrix sliced for all ops: the ops' feedback stays independent, as in the dense form, and
projections above ``CACHE_LIMIT`` entries are redrawn rather than stored, so sharing one
would save memory only for small models (the 4-layer byte-level Llama of
``examples/lm_rules.py`` caches 2.4 M numbers, 9 MiB).

Convolutions: the *dense per-position* projection (Nøkland's convention): every unit of
the op's input — each channel at each position — gets its own random combination of the
output error, ``P_k`` of shape ``(d_out, C·H·W)``. BioTorch's alternative, a kernel
applied to the error broadcast over positions, gives every position the same feedback,
so a convolution's input gradient carries no spatial structure at all; the dense
projection keeps positions distinct at the cost of ``d_out·C·H·W`` numbers per op.
Memory stays bounded: projections of up to ``CACHE_LIMIT`` entries are drawn once (on
the CPU, identical on every device and process) and cached; larger ones (ResNet-50's
early layers at 224 px with 1,000 classes hold ~10⁸) are redrawn in every backward from
a seeded generator on the op's device, ``BLOCK`` columns at a time, and never stored
(identical across processes on the same device type). The state is a seed per op name.
``store_feedback=False`` caches nothing: every projection is redrawn in every backward (the
small ones on the CPU, as the cached ones were drawn, so the values are the same), at the
cost of ``d_out·D`` Gaussian draws per op and backward.

Scale: ``scale="xavier"`` (default) draws ``P`` with Xavier's std for a linear map from
``d_out`` to ``D = C·H·W`` units, ``sqrt(2 / (d_out + D))``, so ``|P e| ≈ |e|`` for any
``D``; or a positive number (the std). ``"weight"`` has no meaning here (P has no W to
take a scale from) and is refused.

DFA has no W-shaped feedback weight: :func:`pfa_fx.alignment` leaves DFA ops out; the
meaningful measure is :func:`pfa_fx.gradient_alignment` (weight updates against BP's).
Sample layout, tried in this order: an op input whose first axis is the batch; whose
second axis is the batch (sequence-first, as inside ``nn.MultiheadAttention``); whose
first axis is a multiple of the batch (windows of each sample, sample-major, as Swin's).
Others raise naming the op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RuleConfig, check_choice, check_scale, check_store_feedback
from ..draws import derived_seed
from ..errors import ConversionError
from ..node import FeedbackNode
from ..ops import LinearFamily

#: projections with at most this many entries are drawn once and cached per device/dtype
CACHE_LIMIT = 1 << 22
#: columns per seeded draw: part of the projection's definition (its values do not depend
#: on whether it is cached), and the memory bound of a redrawn one (d_out x BLOCK)
BLOCK = 4096
#: the values of the ``form`` option (module docstring)
FORMS = ("auto", "token", "dense")


class OutputError:
    """Shared by the DFA ops of one model: the output error of the step being run."""

    def __init__(self) -> None:
        self.error: Tensor | None = None
        self.where: str | None = None  # which output carried it, e.g. "output[0]"

    def record(self, g: Tensor) -> None:
        """Tensor hook on the main output (a loss computed inside the model): keep ``g``."""
        self.error = g


class _CaptureError(torch.autograd.Function):
    """Identity whose backward records the error reaching the model's output."""

    @staticmethod
    def forward(ctx, y: Tensor, hub: OutputError) -> Tensor:
        ctx.hub = hub
        # detach(), not a view: the output can then be modified in place, and FSDP2 does not
        # warn that a view output would let an in-place op skip its pre-backward hook
        return y.detach()

    @staticmethod
    def backward(ctx, g: Tensor):
        ctx.hub.error = g
        return g, None


def _main_output(out: Any) -> tuple[Any, Tensor] | None:
    """``(key, tensor)`` of the main output: ``None`` key for a bare tensor, an index for a
    tuple/list, a key for a dict. A scalar in a tuple or dict is passed over: it is a loss
    (Hugging Face's ``return_dict=False`` puts it first), not a per-sample output."""
    if isinstance(out, Tensor):
        return None, out
    if isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            if isinstance(v, Tensor) and v.dim() > 0:
                return i, v
        return None
    if isinstance(out, dict):
        for k in ("logits", "out"):
            if isinstance(out.get(k), Tensor):
                return k, out[k]
        for k, v in out.items():
            if isinstance(v, Tensor) and v.dim() > 0:
                return k, v
    return None


def _inner_loss(out: Any, key: Any) -> bool:
    """Whether the output also holds a loss the model computed (from the main output, as
    Hugging Face models given ``labels=`` do): a dict's ``"loss"`` entry, or a scalar next
    to the main output in a tuple/list, that requires grad."""
    if isinstance(out, dict):
        loss = out.get("loss")
        return key != "loss" and isinstance(loss, Tensor) and loss.requires_grad
    if isinstance(out, (tuple, list)):
        return any(isinstance(v, Tensor) and v.dim() == 0 and v.requires_grad for v in out)
    return False


def _replaced(out: Any, key: Any, value: Tensor) -> Any:
    if key is None:
        return value
    if isinstance(out, dict):
        new = dict(out)
        new[key] = value
        return type(out)(new)
    items = list(out)
    items[key] = value
    if isinstance(out, list):
        return items
    return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)


@torch.compiler.disable  # the capture's backward writes Python state: kept out of compiled graphs
def capture_output_error(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: route the main output through :class:`_CaptureError`."""
    hub = module.__dict__.get("pfa_dfa_output")
    if hub is None:
        return None
    hub.error = None  # a new forward: an earlier step's error must never be used
    found = _main_output(output)
    if found is None:
        return None
    key, y = found
    hub.where = "output" if key is None else f"output[{key!r}]"
    if not (torch.is_grad_enabled() and y.requires_grad):
        return None
    if _inner_loss(output, key):
        # the model's own loss was computed from y itself, out of a wrapper's reach: a hook on
        # y gets everything reaching y (that loss and any computed from the returned y) before
        # the op that made y runs its backward
        hub.where += " (the model's own loss reaches it)"
        y.register_hook(hub.record)
        return None
    return _replaced(output, key, _CaptureError.apply(y, hub))


def _flattened_batch_first(x: Tensor, error_shape: tuple[int, ...]) -> bool:
    """Whether a 2-D op input ``(batch·T, d)`` is a view of ``(batch, T, ...)`` (read from its
    ``grad_fn``: a mixture-of-experts router's ``hidden_states.reshape(-1, d)``), so that its
    rows are the output error's positions in order."""
    fn = x.grad_fn
    if x.dim() != 2 or len(error_shape) < 3 or fn is None or x.shape[0] != error_shape[0] * error_shape[1]:
        return False
    for _ in range(4):  # through a chain of views
        if fn is None or not type(fn).__name__.startswith(("ViewBackward", "UnsafeViewBackward", "ReshapeAlias")):
            return False
        sizes = tuple(int(n) for n in getattr(fn, "_saved_self_sym_sizes", ()))
        if len(sizes) >= 3:
            return sizes[:2] == tuple(error_shape[:2])
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return False


@dataclass(frozen=True)
class DFA(RuleConfig):
    """Direct feedback alignment: the network's output error projected straight to each op.

    Args:
        scale: ``"xavier"`` or a positive standard deviation for the projections (DFA's
            projection of the output error has no W to take ``"weight"`` scale from).
        form: ``"token"`` (each position's output error onto that position's units),
            ``"dense"`` (each sample's whole output error onto the op's whole input) or
            ``"auto"`` (token where it applies).
        store_feedback: cache the projections (True) or redraw them in every backward.
    """

    rule = "dfa"
    scale: str | float = "xavier"
    form: str = "auto"
    store_feedback: bool = True

    def validate(self) -> None:
        check_store_feedback(self.store_feedback, self.rule)
        check_choice(
            self.form,
            FORMS,
            "form",
            self.rule,
            " (token: each position's output error projected onto that position's units, Launay et al. 2020; "
            "dense: each sample's whole output error onto the op's whole input; auto: token where it applies)",
        )
        check_scale(self.scale, self.rule, ("xavier",))


class DFANode(FeedbackNode):
    """DFA's state for one op: a seed from which its projections are drawn (module
    docstring)."""

    rule = "dfa"
    config_type = DFA
    traceable_backward = False  # the output error exists only during the backward
    has_feedback_weight = False

    def __init__(self, weight: Tensor, *, generator: torch.Generator, **kwargs: Any):
        super().__init__(weight, generator=generator, **kwargs)
        self.store_feedback = self.rule_config.store_feedback
        self.form = self.rule_config.form
        #: the form this op's last backward used ("token" or "dense"; None before its first)
        self.last_form: str | None = None
        self.scale = self.rule_config.scale
        # the projections' shapes are known only in the first backward: keep a seed
        self._draw_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._cache: dict[tuple, Tensor] = {}
        self._output: OutputError | None = None

    @property
    def draws_from_seed(self) -> bool:
        return True  # the projections are drawn in the backward from a seed, never saved

    @property
    def config(self) -> dict[str, Any]:
        # form appears only where it is not "auto": a default conversion keeps the config,
        # repr, report and checkpoint record it had before the option existed
        return {k: v for k, v in super().config.items() if not (k == "form" and v == "auto")}

    def state_numel(self) -> int:
        # the cached projections are held too (none under store_feedback=False)
        return super().state_numel() + sum(P.numel() for P in self._cache.values())

    # -- the projection ----------------------------------------------------------------
    def projection_std(self, d_out: int, d_in: int) -> float:
        if isinstance(self.scale, str):
            return math.sqrt(2.0 / (d_out + d_in))
        return float(self.scale)

    def _chunks(self, d_out: int, d_in: int, device: torch.device):
        """``(start, stop, P[:, start:stop])`` in float32, each from its own seeded draw."""
        cols = BLOCK
        std = self.projection_std(d_out, d_in)
        gen = torch.Generator(device=device)
        for i, start in enumerate(range(0, d_in, cols)):
            stop = min(d_in, start + cols)
            gen.manual_seed(derived_seed(self._draw_seed, d_out, d_in, i))
            p = torch.randn((d_out, stop - start), generator=gen, device=device, dtype=torch.float32)
            yield start, stop, p.mul_(std)

    def projection(self, d_out: int, d_in: int, device: torch.device | str = "cpu") -> Tensor:
        """The whole ``(d_out, d_in)`` projection ``P`` (float32) this op uses for an output
        error of ``d_out`` numbers and an input of ``d_in`` per sample."""
        device = torch.device(device)
        gen_device = torch.device("cpu") if d_out * d_in <= CACHE_LIMIT else device
        return torch.cat([p for _, _, p in self._chunks(d_out, d_in, gen_device)], 1).to(device)

    def project(self, e: Tensor, d_in: int) -> Tensor:
        """``e @ P``: ``(n, d_out)`` output errors to ``(n, d_in)`` input errors."""
        d_out = e.shape[1]
        if d_out * d_in <= CACHE_LIMIT:
            key = (d_out, d_in, e.device, e.dtype)
            P = self._cache.get(key)
            if P is None:
                P = self.projection(d_out, d_in).to(device=e.device, dtype=e.dtype)
                if self.store_feedback:  # else dropped when this backward returns
                    self._cache[key] = P
            return e.mm(P)
        out = e.new_empty((e.shape[0], d_in))
        for start, stop, p in self._chunks(d_out, d_in, e.device):
            out[:, start:stop] = e.mm(p.to(e.dtype))
        return out

    def token_layout(
        self, x_shape: tuple[int, ...], error_shape: tuple[int, ...], feature_last: bool = True
    ) -> str | None:
        """Where the output error's token axis lies in an op input of shape ``x_shape``:
        ``"batch-first"`` for ``(batch, T, ...)``, ``"sequence-first"`` for ``(T, batch,
        ...)``, or None where the token form does not apply (an output or input of rank
        under 3, no matching axes, or an op whose features are not on the last axis: a
        convolution, ``feature_last=False``). ``error_shape`` is the output's ``(batch, T, ...)``."""
        if not feature_last or len(error_shape) < 3 or len(x_shape) < 3:
            return None
        n, t = error_shape[0], error_shape[1]
        if x_shape[0] == n and x_shape[1] == t:
            return "batch-first"
        if x_shape[0] == t and x_shape[1] == n:
            return "sequence-first"
        return None

    def token_error(self, err: Tensor, x: Tensor, layout: str) -> Tensor:
        """The token form: ``e[b, t] @ P`` for every position, ``P = projection(V, d)``, in
        ``x``'s shape (``V``, ``d``: the numbers per position of the error and of ``x``)."""
        n, t = err.shape[0], err.shape[1]
        e = err.reshape(n * t, -1).to(x.dtype)
        g = self.project(e, x.numel() // (n * t))
        if layout == "batch-first":
            return g.reshape(x.shape)
        return g.reshape(n, t, *x.shape[2:]).transpose(0, 1).contiguous()

    def input_error(self, x: Tensor, feature_last: bool = True) -> Tensor:
        """``P(e)`` in ``x``'s shape, from the output error captured this step, in the form
        the ``form`` option picks for this input (``feature_last``: the op is linear, its
        input's features on the last axis)."""
        err = None if self._output is None else self._output.error
        name = getattr(self, "op_name", "?")
        if err is None:
            raise RuntimeError(
                f"dfa: op '{name}' needs the model's output error, but none was captured in this "
                "backward: compute the loss from the converted model's main output (the output itself, "
                "the first tensor of a tuple, or a dict's 'logits'/'out'), or have the model compute it "
                "and return it next to that output (a dict's 'loss', as Hugging Face's labels= does)"
            )
        if err.dim() == 0:
            raise RuntimeError(
                f"dfa: op '{name}' needs the error at the model's per-sample output, but the model's main "
                f"output ({getattr(self._output, 'where', None) or 'output'}) is a scalar, a loss: return the "
                "output the loss is computed from too (e.g. a dict with 'loss' and 'logits'), or compute the "
                "loss outside the model from its output"
            )
        if self.form != "dense":
            layout = self.token_layout(tuple(x.shape), tuple(err.shape), feature_last)
            if layout is None and feature_last and _flattened_batch_first(x, tuple(err.shape)):
                layout = "batch-first"  # (batch·T, d): a router's input, viewed from (batch, T, d)
            if layout is not None:
                self.last_form = "token"
                return self.token_error(err, x, layout)
            if self.form == "token":
                kind = "linear" if feature_last else "convolution"
                raise RuntimeError(
                    f"dfa: op '{name}' ({kind}, input of shape {tuple(x.shape)}) has no token axis matching the "
                    f"output error's {tuple(err.shape)} (batch, T, ...): form='token' needs a linear op whose input "
                    "is (batch, T, ...) or (T, batch, ...); use form='auto' (the dense form for such ops) or give "
                    "this op form='dense' with a rule mapping, e.g. {'" + name + "': ('dfa', {'form': 'dense'}), "
                    "'*': ('dfa', {'form': 'token'})}"
                )
        self.last_form = "dense"
        n = err.shape[0]
        e = err.reshape(n, -1).to(x.dtype)
        d_in = x.numel() // n
        if x.shape[0] == n:
            return self.project(e, d_in).reshape(x.shape)
        if x.dim() > 1 and x.shape[1] == n:  # sequence-first (seq, batch, ...), as MHA's inner ops
            g = self.project(e, d_in).reshape(n, x.shape[0], *x.shape[2:])
            return g.transpose(0, 1).contiguous()
        if x.shape[0] % n == 0:  # windows of each sample, sample-major (Swin)
            return self.project(e, d_in).reshape(x.shape)
        raise RuntimeError(
            f"dfa: op '{name}' has input of shape {tuple(x.shape)}, whose samples cannot be matched "
            f"with the output error's batch of {n}; keep this op on another rule with a rule mapping"
        )

    # -- the op's backward -------------------------------------------------------------
    def backward(self, family, e, x, weight, state, need):
        # BP's weight and bias gradients for the error that reached the op; no kernel read
        _, gw, gb = family.fused(e, x, weight, False, need.w, need.b)
        gx = self.input_error(x, family is LinearFamily) if need.x else None
        return gx, gw, gb, ()

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        raise TypeError(
            "dfa has no W-shaped feedback weight (an op's input error is a projection of the model's "
            "output error); use pfa_fx.gradient_alignment to compare its updates with BP's"
        )

    # -- model-level hooks -------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, nodes: list[tuple[str, FeedbackNode]]) -> None:
        banks = [name for name, node in nodes if getattr(node, "expert_bank", False)]
        if banks:
            raise ConversionError(
                f"dfa cannot serve expert-mixed kernels ({', '.join(banks)}): their routing's error needs a "
                "W-shaped feedback bank; map these ops to another rule, e.g. {'" + banks[0] + "': 'fa', '*': 'dfa'}"
            )
        hub = OutputError()
        for _, node in nodes:
            node._output = hub
        model.pfa_dfa_output = hub
        model.register_forward_hook(capture_output_error)

    @classmethod
    def report_notes(cls, model: nn.Module, nodes: list[tuple[str, FeedbackNode]]) -> list[str]:
        hub = model.__dict__.get("pfa_dfa_output")
        where = getattr(hub, "where", None) or "the main output (known after the first forward)"
        lines = [f"dfa: {len(nodes)} ops take a fixed random projection of the output error captured at {where}"]
        used = [node.last_form for _, node in nodes]
        if "token" in used:  # models without a token axis keep the report they always had
            lines.append(
                f"dfa: in the last backward, {used.count('token')} ops took the per-token projection, "
                f"{used.count('dense')} the dense one"
            )
        return lines
