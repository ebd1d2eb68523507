"""Bytes per rank for training large models under FSDP2, for every rule, computed on the meta device.

Nothing is allocated: each model is built on ``torch.device("meta")`` and every weight op's
feedback node is built from its meta weight by the rule's own class (``make_node``, as
``pfa_fx.convert`` builds it), inside :class:`MetaDraws`, under which every factory call that
would draw more than a few numbers on the CPU (``FeedbackNode.draw``, PFA's ``B`` and ``R``)
makes a meta tensor instead, and :class:`NoRealAllocation`, which fails the run if any real
tensor of more than ``SMALL`` numbers is made anyway. The nodes' own tensors (names, shapes,
dtypes) are then those a real conversion holds; ``tests/test_memory_at_scale.py`` checks that
against real conversions of small models, for every rule.

What is counted, per rank, in the model's dtype (float32, or everything bfloat16 with
``--dtype bf16``; no mixed precision, no fp32 master copy):

- **weights**: the model's parameters, each sharded along dim 0 as FSDP2 does it
  (``fully_shard`` per block, then the root: every rank holds ``ceil(rows / N)`` rows, the
  last ranks padded), plus the model's buffers (replicated: FSDP2 never shards buffers).
- **feedback**: each node's tensors, classified by :func:`classify`:
  ``trainable`` (plastic parameters: KP's ``B``, PFA's ``R``, compact PFA's ``S``),
  ``fixed`` (fixed random state that ``store_feedback=False`` drops and redraws in every
  backward: FA's ``B``, frSF's ``M``, explicit PFA/PFA-o's ``B``, DFA's cached projections),
  ``plastic`` (WM's and PAL's ``B``: learned by the rule's own step, not by the optimizer;
  always stored) and ``kept`` (other buffers: compact PFA's derived ``G``). Under the
  placement being built, fixed feedback is a frozen parameter sharded with its block and
  plastic feedback a trainable one, so all of these are sharded like weights, PFA's
  per-group ``(groups, n_out/groups, ·)`` tensors with the group axis folded into the rows;
  0-dim buffers (implicit forms' ``alpha``) stay replicated. DFA's cached projections are
  not module state: replicated on every rank.
- **grads**: one per trainable tensor (model parameters and plastic feedback), sharded
  (reduce-scatter), plus PAL's pending update (W-sized per op, held from the noisy pass to
  the optimizer step; counted sharded with its ``B``).
- **optimizer**: SGD with momentum keeps 1 buffer per trainable tensor, Adam 2 (scalar step
  counts left out). Compact PFA equals explicit PFA only under SGD; under Adam it is the
  supported form of its own (docs/alignment.md: ``S`` follows W's updates), which its Adam
  column sizes.
- **gathered**: the largest FSDP group's unsharded weights plus its held feedback state, all
  gathered at once (the root group too: FSDP2 leaves the root unsharded between forward and
  backward). What bounds one rank's peak beyond its shards, with activations, the backward's
  W-sized ``W_b`` and FSDP2's prefetch of the next block left out.
- **redrawn**: the largest feedback tensor drawn on the fly in one op's backward: a
  ``store_feedback=False`` tensor redrawn whole, or DFA's projection, which is always redrawn
  ``BLOCK`` columns at a time where it is too large to cache (``d_out × 4096`` float32 numbers,
  ``d_out`` the numbers of the model's output per sample). Not part of the totals.

Activations are not counted. Op list: ``hidden_weights`` of the whole model, the same
enumeration the eager front end uses (checked against ``pfa_fx.op_names`` in the test).

    python benchmarks/memory_at_scale.py                     # all four models, print the tables
    python benchmarks/memory_at_scale.py --dtype bf16 --models llama-7b
    python benchmarks/memory_at_scale.py --markdown          # and append a section to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pfa_fx
from pfa_fx.errors import ConversionError
from pfa_fx.install import make_node
from pfa_fx.node import FeedbackNode
from pfa_fx.rules import rule_class
from pfa_fx.rules.dfa import BLOCK, CACHE_LIMIT
from pfa_fx.rules.pfa import PFANode

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _shared import command_line, git_revision, hidden_weights, host_line, md_table
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._shared import command_line, git_revision, hidden_weights, host_line, md_table

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## Memory per rank at scale (meta device, FSDP2 accounting)"
GIB = 2**30
#: real (non-meta) tensors up to this many numbers may be made while nodes are built:
#: the scalar seed draws (``int(torch.randint(..., (1,), generator=g))``) must stay real
SMALL = 64

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PFA_EXPANSION = PFANode.options["expansion"]  # the default, as convert uses it

#: variant label -> (rule, options); the defaults of pfa_fx.convert where no option is given
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bp": ("bp", {}),
    "fa": ("fa", {}),
    "dfa": ("dfa", {}),
    "sf (usf)": ("sf", {"variant": "usf"}),
    "sf (frsf)": ("sf", {"variant": "frsf"}),
    "kp": ("kp", {}),
    "wm": ("wm", {}),
    "pal": ("pal", {}),
    f"pfa ×{PFA_EXPANSION}": ("pfa", {}),
    f"pfa ×{PFA_EXPANSION} compact": ("pfa", {"compact": True}),
    f"pfa-o ×{PFA_EXPANSION}": ("pfa-o", {}),
}

#: (rule, buffer) of fixed random state that ``store_feedback=False`` redraws instead of holding
FIXED_RANDOM = {("fa", "B"), ("sf", "M"), ("pfa", "B"), ("pfa-o", "B")}
#: (rule, buffer) of plastic feedback learned by the rule's own step (no optimizer, no gradient)
PLASTIC_BUFFERS = {("wm", "B"), ("pal", "B")}
#: rules whose nodes hold a W-sized pending update between forward and optimizer step
PENDING_UPDATE = {"pal": "B"}


# -- the models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model built on the meta device, with what the accounting needs to know of it."""

    label: str
    build: Callable[[], nn.Module]  # the model, on whatever device is current
    blocks: str  # dotted path of the container whose children are the fully_shard blocks
    example: Callable[[int, torch.dtype], Any]  # meta inputs of one sample (DFA's sizes), from --seq
    about: str


def _llama(**cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))

    return build


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    return build


def _tokens(seq: int, dtype: torch.dtype) -> dict[str, Tensor]:
    return {"input_ids": torch.zeros(1, seq, dtype=torch.long, device="meta")}


def _image(seq: int, dtype: torch.dtype) -> Tensor:
    return torch.zeros(1, 3, 224, 224, device="meta", dtype=dtype)


MODELS: dict[str, ModelSpec] = {
    "llama-1b": ModelSpec(
        "Llama 1B",
        _llama(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            vocab_size=128256,
            tie_word_embeddings=True,
        ),
        "model.layers",
        _tokens,
        "Llama-3.2-1B shapes: hidden 2048, 16 layers, 32 heads, 8 kv heads, SwiGLU 8192, vocabulary 128,256, "
        "tied embeddings",
    ),
    "llama-7b": ModelSpec(
        "Llama 7B",
        _llama(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=11008,
            vocab_size=32000,
            tie_word_embeddings=False,
        ),
        "model.layers",
        _tokens,
        "Llama-2-7B shapes: hidden 4096, 32 layers, 32 heads, SwiGLU 11008, vocabulary 32,000, untied",
    ),
    "vit-l-16": ModelSpec(
        "ViT-L/16", _tv("vit_l_16"), "encoder.layers", _image, "torchvision vit_l_16, 224 px, 1,000 classes"
    ),
    "vit-h-14": ModelSpec(
        "ViT-H/14", _tv("vit_h_14"), "encoder.layers", _image, "torchvision vit_h_14, 224 px, 1,000 classes"
    ),
}


def build_meta(spec: ModelSpec, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter and buffer on the meta device, in ``dtype``."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. transformers on configs without token ids
        model = spec.build()
    return model.to(dtype)


def block_names(model: nn.Module, spec: ModelSpec) -> list[str]:
    """The module paths ``fully_shard`` is called on before the root, one per block."""
    container = model.get_submodule(spec.blocks)
    return [f"{spec.blocks}.{name}" for name, _ in container.named_children()]


def group_of(name: str, blocks: list[str]) -> str:
    """The FSDP group owning a parameter or op of this dotted name: its block, else the root."""
    for b in blocks:
        if name == b or name.startswith(b + "."):
            return b
    return "root"


# -- building nodes with nothing allocated -----------------------------------------------------


class MetaDraws(TorchFunctionMode):
    """Every factory call (``torch.randn``, ``torch.empty``, ...) without a device that would
    make more than :data:`SMALL` numbers makes a meta tensor of the same shape and dtype
    instead; smaller ones (a node's scalar seed draws, which are read back with ``int()``)
    stay real. Nothing in pfa_fx is patched: a node built from a meta weight under this mode
    runs its own ``__init__``, draws and all, and ends with meta tensors of the shapes and
    dtypes a real node holds (a weight on the meta device already sends the casts there)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONSTRUCTORS and kwargs.get("device") is None:
            # made on meta first, to learn its size at no cost (the mode is off in here)
            probe = func(*args, **{**kwargs, "device": "meta"})
            if isinstance(probe, Tensor) and probe.numel() > SMALL:
                return probe
        return func(*args, **kwargs)


def _constructors() -> set:
    # torch's own list of the factories torch.device(...) as a context redirects
    from torch.utils._device import _device_constructors

    return set(_device_constructors())


_CONSTRUCTORS = _constructors()


class NoRealAllocation(TorchDispatchMode):
    """Fails on any real (non-meta) tensor of more than ``limit`` numbers made inside it:
    the proof that the accounting allocated nothing."""

    def __init__(self, limit: int = SMALL) -> None:
        super().__init__()
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta" and t.numel() > self.limit:
                raise AssertionError(f"{func} made a real tensor of shape {tuple(t.shape)} on {t.device}")
        return out


@contextlib.contextmanager
def nothing_allocated() -> Iterator[None]:
    """:class:`MetaDraws` inside :class:`NoRealAllocation`."""
    with NoRealAllocation(), MetaDraws():
        yield


def meta_node(
    rule: str, options: dict[str, Any], weight: Tensor, groups: int, key: str, transposed: bool
) -> FeedbackNode:
    """The node ``convert`` would make for this (meta) weight, built with nothing allocated."""
    with nothing_allocated():
        return make_node(rule, options, weight, groups, 0, key, transposed)


# -- classifying a node's tensors ----------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One tensor the accounting counts: its FSDP group, kind, size and sharding."""

    group: str
    kind: str  # weight, model_buffer, trainable, fixed, projection (DFA's cache), plastic, kept, scalar, pending
    numel: int
    rows: int  # rows FSDP2 shards along (dim 0; PFA's group axis folded in)
    itemsize: int
    replicated: bool = False

    def per_rank(self, ranks: int) -> int:
        """Bytes one rank holds: a replicated tensor whole, else its padded dim-0 shard."""
        if self.replicated or self.rows == 0:  # a zero-size tensor: nothing to shard
            return self.numel * self.itemsize
        return math.ceil(self.rows / ranks) * (self.numel // self.rows) * self.itemsize

    def as_is(self, ranks: int, rows: int) -> int:
        """Bytes per rank if sharded along a dim 0 of ``rows`` rows instead."""
        return math.ceil(rows / ranks) * (self.numel // rows) * self.itemsize

    @property
    def full(self) -> int:
        return self.numel * self.itemsize


def classify(node: FeedbackNode) -> dict[str, str]:
    """``{tensor name: kind}`` for a node's parameters and buffers (module docstring)."""
    kinds = {}
    for name, p in node.named_parameters(recurse=False):
        kinds[name] = "trainable" if p.requires_grad else "fixed"
    for name, b in node.named_buffers(recurse=False):
        if (node.rule, name) in FIXED_RANDOM:
            kinds[name] = "fixed"
        elif (node.rule, name) in PLASTIC_BUFFERS:
            kinds[name] = "plastic"
        else:
            kinds[name] = "scalar" if b.dim() == 0 else "kept"
    return kinds


def node_tensors(node: FeedbackNode) -> Iterator[tuple[str, str, Tensor]]:
    """``(name, kind, tensor)`` for each of a node's own parameters and buffers."""
    kinds = classify(node)
    for name, t in [*node.named_parameters(recurse=False), *node.named_buffers(recurse=False)]:
        yield name, kinds[name], t


def shard_rows(node: FeedbackNode, name: str, t: Tensor) -> int:
    """Rows FSDP2 would shard this tensor along: dim 0, and for PFA's ``(groups, n_out/groups,
    ·)`` tensors (``B``, ``G``) the group axis folded into the rows: ``capture="modules"``
    holds a ``(1, n_out, ·)`` one squeezed to ``(n_out, ·)``, which dim-0 sharding splits)."""
    if t.dim() == 0:
        return 1
    if isinstance(node, PFANode) and name in ("B", "G") and t.dim() == 3:
        return t.shape[0] * t.shape[1]
    return t.shape[0]


# -- DFA's projections -----------------------------------------------------------------------


def dfa_sizes(model: nn.Module, spec: ModelSpec, seq: int) -> tuple[int, dict[str, int | None]]:
    """``(d_out, {op: d_in})`` per sample, from one forward of the meta model (with autograd
    on: free on meta): the sizes of DFA's projection ``P`` (``d_out × d_in``) for each op;
    ``d_in`` is None for an op whose input carries no gradient (the first op, reading the
    data), which never draws its projection."""
    ops = {h.key: h for h in hidden_weights(model, "")}
    seen: dict[int, tuple[int, bool]] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        seen[id(module)] = (x.numel(), x.requires_grad)  # one sample: the batch is 1

    owners = {id(h.owner): h.owner for h in ops.values()}
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in owners.values()]
    try:
        example = spec.example(seq, next(model.parameters()).dtype)
        out = model(**example) if isinstance(example, dict) else model(example)
    finally:
        for h in handles:
            h.remove()
    out = getattr(out, "logits", out)
    d_out = out[0].numel()
    sizes: dict[str, int | None] = {}
    for key, h in ops.items():
        found = seen.get(id(h.owner))
        if found is None:  # a Linear its parent applies by hand: nn.MultiheadAttention's out_proj,
            # whose input (the attention's output, as wide as the query) always carries a gradient
            parent = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else None
            query = seen.get(id(parent)) if isinstance(parent, nn.MultiheadAttention) else None
            found = None if query is None else (query[0], True)
        if found is None:
            raise RuntimeError(f"the meta forward did not show the input of op {key!r}")
        sizes[key] = found[0] if found[1] else None
    return d_out, sizes


# -- the accounting ----------------------------------------------------------------------------


@dataclass
class Layout:
    """One model converted with one variant: every counted tensor, and the redraw sizes."""

    items: list[Item]
    redraw_fixed: int  # bytes of the largest fixed tensor (redrawn whole when not stored)
    redraw_always: int  # bytes of the largest projection block DFA redraws even when stored
    ops: int
    as_is: dict[str, list[tuple[Item, int]]]  # PFA's B/G by name, with the rows dim 0 has today


def layout(model: nn.Module, spec: ModelSpec, rule: str, options: dict[str, Any], dfa: tuple | None) -> Layout:
    """Every tensor of ``model`` converted with ``rule``, as :class:`Item` records."""
    blocks = block_names(model, spec)
    items = []
    for name, p in model.named_parameters():  # tied weights once
        items.append(Item(group_of(name, blocks), "weight", p.numel(), p.shape[0] if p.dim() else 1, p.element_size()))
    for name, b in model.named_buffers():
        items.append(Item(group_of(name, blocks), "model_buffer", b.numel(), 1, b.element_size(), replicated=True))
    redraw_fixed = redraw_always = 0
    as_is: dict[str, list[tuple[Item, int]]] = {}
    ops = hidden_weights(model, "")
    for h in ops:
        group = group_of(h.key, blocks)
        node = meta_node(rule, options, h.weight, h.groups, h.key, h.transposed)
        for name, kind, t in node_tensors(node):
            item = Item(group, kind, t.numel(), shard_rows(node, name, t), t.element_size(), kind == "scalar")
            items.append(item)
            if kind == "fixed":
                redraw_fixed = max(redraw_fixed, item.full)
            if item.rows != (t.shape[0] if t.dim() else 1):
                as_is.setdefault(name, []).append((item, t.shape[0]))
            if PENDING_UPDATE.get(rule) == name:
                items.append(Item(group, "pending", t.numel(), item.rows, t.element_size()))
        if rule == "dfa":
            d_out, d_in = dfa[0], dfa[1][h.key]
            itemsize = h.weight.element_size()  # P is cached in the error's dtype
            if d_in is None:
                continue  # no gradient wanted for the op's input: no projection drawn
            if d_out * d_in <= CACHE_LIMIT:
                items.append(Item(group, "projection", d_out * d_in, d_out, itemsize, replicated=True))
                redraw_fixed = max(redraw_fixed, d_out * min(BLOCK, d_in) * 4)
            else:  # drawn in float32, BLOCK columns at a time, in every backward
                redraw_always = max(redraw_always, d_out * min(BLOCK, d_in) * 4)
    return Layout(items, redraw_fixed, redraw_always, len(ops), as_is)


@dataclass
class Row:
    """Bytes per rank for one (variant, stored, ranks)."""

    weights: int
    feedback: int
    grads: int
    sgd: int  # momentum buffers
    adam: int  # first and second moments

    @property
    def total_sgd(self) -> int:
        return self.weights + self.feedback + self.grads + self.sgd

    @property
    def total_adam(self) -> int:
        return self.weights + self.feedback + self.grads + self.adam


#: feedback held whether or not fixed feedback is stored
FEEDBACK_KINDS = {"trainable", "plastic", "kept", "scalar"}
#: fixed feedback: held only when stored (DFA's cached projections are not module state)
FIXED_KINDS = {"fixed", "projection"}


def per_rank(lay: Layout, ranks: int, stored: bool) -> Row:
    """Bytes per rank (module docstring), fixed feedback held or not."""

    def total(*kinds: str) -> int:
        return sum(i.per_rank(ranks) for i in lay.items if i.kind in kinds)

    fb_kinds = FEEDBACK_KINDS | (FIXED_KINDS if stored else set())
    trainable = total("weight", "trainable")
    return Row(
        weights=total("weight", "model_buffer"),
        feedback=total(*fb_kinds),
        grads=trainable + total("pending"),
        sgd=trainable,
        adam=2 * trainable,
    )


def gathered(lay: Layout, stored: bool) -> tuple[int, str]:
    """Bytes of the largest FSDP group gathered whole (weights + held feedback), and its name."""
    kinds = {"weight", "model_buffer"} | FEEDBACK_KINDS | (FIXED_KINDS if stored else set())
    by_group: dict[str, int] = {}
    for i in lay.items:
        if i.kind in kinds:
            by_group[i.group] = by_group.get(i.group, 0) + i.full
    group = max(by_group, key=by_group.get)
    return by_group[group], group


def redrawn(lay: Layout, stored: bool) -> int:
    """Bytes of the largest feedback tensor drawn on the fly in one op's backward."""
    return max(lay.redraw_always, 0 if stored else lay.redraw_fixed)


def has_fixed(lay: Layout) -> bool:
    """Whether the variant holds fixed feedback that ``store_feedback=False`` would drop."""
    return any(i.kind in FIXED_KINDS for i in lay.items)


# -- cross-check against store_feedback, where convert has it -------------------------------------


def store_feedback_supported() -> bool:
    """Whether ``pfa_fx.convert`` accepts ``store_feedback`` (another branch adds it)."""
    try:
        pfa_fx.convert(nn.Sequential(nn.Linear(4, 3)), "fa", store_feedback=False)
    except (ConversionError, TypeError) as err:
        if "store_feedback" in str(err):
            return False
        raise
    return True


def held_names(node: FeedbackNode) -> dict[str, int]:
    """``{name: numel}`` of a node's parameters and saved buffers of more than one number
    (not the redraw's layout probe: four numbers, never saved)."""
    tensors = [*node.named_parameters(recurse=False), *node.named_buffers(recurse=False)]
    return {name: t.numel() for name, t in tensors if t.numel() > 1 and name not in node._non_persistent_buffers_set}


def check_store_feedback(model: nn.Module, variants: dict[str, tuple[str, dict]] = VARIANTS, **kw: Any) -> int:
    """Assert that, for every variant, ``store_feedback=False`` drops exactly the tensors
    :func:`classify` calls ``fixed``. Returns the number of ops compared."""
    compared = 0
    for rule, options in variants.values():
        if "store_feedback" not in rule_class(rule).options:
            continue  # bp holds nothing; kp/wm/pal learn their feedback, which must be stored
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = dict(pfa_fx.feedback_modules(pfa_fx.convert(model, rule, **options, **kw)))
            dropped = dict(pfa_fx.feedback_modules(pfa_fx.convert(model, rule, store_feedback=False, **options, **kw)))
        assert kept.keys() == dropped.keys(), rule
        for op, node in kept.items():
            kinds = classify(node)
            expect = {n: k for n, k in held_names(node).items() if kinds[n] != "fixed"}
            got = held_names(dropped[op])
            assert got == expect, f"{rule} {op}: store_feedback=False holds {got}, classified {expect}"
            compared += 1
    return compared


def small_vit() -> nn.Module:
    """A small torchvision ViT with real weights (the cross-checks)."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )


def small_llama(tied: bool = True) -> nn.Module:
    """A small Hugging Face Llama with real weights (the cross-checks)."""
    import transformers

    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def check_op_list(model: nn.Module) -> int:
    """Assert that the ops this script counts (``hidden_weights``) are the ops ``pfa_fx.convert``
    converts by its default front end (torch.export for a Hugging Face model, torch.fx for a
    torchvision one), with the same weight shapes. Returns the number of ops."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = {k: n.weight_shape for k, n in pfa_fx.feedback_modules(pfa_fx.convert(model, "fa"))}
    counted = {h.key: tuple(h.weight.shape) for h in hidden_weights(model, "")}
    assert counted == converted, f"counted {counted}, converted {converted}"
    return len(counted)


# -- output --------------------------------------------------------------------------------------


def gib(b: float) -> str:
    """Bytes as GiB with about three significant digits."""
    g = b / GIB
    if g == 0:
        return "0"
    return f"{g:.0f}" if g >= 100 else f"{g:.1f}" if g >= 10 else f"{g:.2f}" if g >= 0.1 else f"{g:.3f}"


def pair(values: list[int]) -> str:
    return " / ".join(gib(v) for v in values)


def model_table(key: str, args: argparse.Namespace, dtype: torch.dtype) -> tuple[list[str], list[str]]:
    """The markdown lines of one model's table, and its notes."""
    spec = MODELS[key]
    model = build_meta(spec, dtype)
    dfa = dfa_sizes(model, spec, args.seq)
    n_params = sum(p.numel() for p in model.parameters())
    ranks = args.ranks
    header = [
        "rule",
        "fixed fb",
        "weights",
        "feedback",
        "grads",
        "SGD mom.",
        "Adam m+v",
        "total SGD",
        "total Adam",
        "gathered group",
        "redrawn",
    ]
    rows, notes = [], []
    ops = 0
    for label, (rule, options) in VARIANTS.items():
        lay = layout(model, spec, rule, options, dfa)
        ops = lay.ops
        never_held = rule == "dfa" and not has_fixed(lay)  # every projection too large to cache
        for stored in (True, False) if has_fixed(lay) else (True,):
            r = [per_rank(lay, n, stored) for n in ranks]
            size, group = gathered(lay, stored)
            where = "root" if group == "root" else "block"
            red = redrawn(lay, stored)
            rows.append(
                [
                    label,
                    "redrawn (none cacheable)"
                    if never_held
                    else ("stored" if stored else "redrawn")
                    if has_fixed(lay)
                    else "–",
                    pair([x.weights for x in r]),
                    pair([x.feedback for x in r]),
                    pair([x.grads for x in r]),
                    pair([x.sgd for x in r]),
                    pair([x.adam for x in r]),
                    pair([x.total_sgd for x in r]),
                    pair([x.total_adam for x in r]),
                    f"{gib(size)} ({where})",
                    gib(red) if red else "–",
                ]
            )
        n = max(ranks)
        for name, pairs in lay.as_is.items():
            if n == 1:
                break
            folded = sum(i.per_rank(n) for i, _ in pairs)
            today = sum(i.as_is(n, rows) for i, rows in pairs)
            notes.append(
                f"{label}: {name} is sharded along n_out, {gib(folded)} GiB per rank at {n} ranks: capture='modules' "
                f"holds its (1, n_out, ·) layout squeezed to (n_out, ·) so that FSDP2's dim-0 sharding splits it "
                f"(unsplit it would be {gib(today)} GiB on every rank)"
            )
    d_out = dfa[0]
    cached = sum(1 for d_in in dfa[1].values() if d_in is not None and d_out * d_in <= CACHE_LIMIT)
    notes.append(
        f"dfa: d_out = {d_out:,} numbers per sample"
        + (f" ({args.seq} tokens × vocabulary)" if spec.example is _tokens else "")
        + f"; {cached} of {ops} ops have a projection small enough to cache (≤ {CACHE_LIMIT:,} entries)"
    )
    title = (
        f"**{spec.label}** ({spec.about}): {n_params / 1e9:.2f} B parameters, {ops} weight ops, "
        f"{len(block_names(model, spec))} blocks. GiB per rank, `{' / '.join(map(str, ranks))}` ranks"
    )
    lines = [title, "", *md_table(header, rows, "ll" + "r" * (len(header) - 2))]
    return lines, notes


def report(args: argparse.Namespace) -> str:
    """The whole section: heading, how it was made, one table per model, notes."""
    dtype = DTYPES[args.dtype]
    checked = ""
    if args.check_ops:  # the op list of each model family against a real conversion
        checked += (
            f" Op list checked against `pfa_fx.convert` on a small Llama with tied embeddings "
            f"({check_op_list(small_llama())} ops, torch.export) and a small torchvision ViT "
            f"({check_op_list(small_vit())} ops, torch.fx)."
        )
    if store_feedback_supported():
        n = check_store_feedback(small_vit())
        checked += f" `store_feedback=False` cross-checked against this classification on a small ViT ({n} ops)."
    else:
        checked += " `pfa_fx.convert` does not accept `store_feedback` yet: the classification is this script's own."
    import transformers

    rev = git_revision() or "unknown revision"
    out = [
        HEADING,
        "",
        f"`{command_line()}` ({date.today()}, {host_line()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, pfa_fx at {rev}). "
        "Computed on the meta device: every node built by its own rule class from a meta weight, "
        f"nothing allocated (a dispatch guard fails on any real tensor of more than {SMALL} numbers)." + checked,
        "",
        f"Every tensor in {'float32' if args.dtype == 'fp32' else 'bfloat16 (no float32 master copy)'}; "
        "FSDP2 `fully_shard` per block then root, every parameter sharded along its rows (padded), buffers "
        "replicated; fixed feedback counted as a frozen parameter sharded with its block, plastic feedback as a "
        "trainable one. *fixed fb*: fixed random feedback held (*stored*) or regenerated in each backward "
        "(*redrawn*, `store_feedback=False`), – where the rule has none. *grads*: model weights + plastic "
        "feedback (+ PAL's pending update). *SGD mom.* / *Adam m+v*: optimizer state. *gathered group*: the "
        "largest FSDP group's full weights + held feedback, gathered at once (independent of the ranks; the "
        "root stays gathered between forward and backward). *redrawn*: the largest feedback tensor drawn in one "
        f"op's backward (fixed state redrawn whole; DFA's projection {BLOCK} columns at a time), not in the "
        f"totals. Activations not counted. PFA at the default expansion {PFA_EXPANSION}.",
        "",
    ]
    for key in args.models:
        lines, notes = model_table(key, args, dtype)
        out += [*lines, "", *(f"- {n}" for n in notes), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 8])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--seq", type=int, default=2048, help="tokens per sample for the language models (DFA's sizes)")
    p.add_argument(
        "--no-op-check",
        dest="check_ops",
        action="store_false",
        help="skip checking the op list against real conversions of small models (a few seconds)",
    )
    p.add_argument(
        "--markdown",
        nargs="?",
        const=str(RESULTS),
        help=f"append the section to this file (default {RESULTS.relative_to(RESULTS.parent.parent)})",
    )
    args = p.parse_args(argv)
    text = report(args)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)
    return text


if __name__ == "__main__":
    main()
