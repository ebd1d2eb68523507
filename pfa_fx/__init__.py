"""pfa_fx: train any PyTorch model with credit-assignment rules that avoid weight symmetry.

``pfa_fx.convert(model, rule="pfa")`` rewrites every weight op of a model (a torch.fx
pass) into a feedback-aware op: identical forward, backward through the rule's feedback
weights. Rules: ``bp``, ``fa``, ``dfa``, ``sf``, ``kp``, ``wm``, ``pal``, ``pfa``, ``pfa-o``,
each with a typed config (``pfa_fx.PFA(expansion=10, compact=True)``), and your own with
:func:`register_rule`.
"""

__version__ = "0.1.0"

from . import counter_rng, hf
from .checkpoint import conversion_config
from .config import RuleConfig
from .convert import convert, op_names
from .errors import ConversionError, ConversionTypeError, TraceError
from .graph_module import ConvertedModule
from .metrics import (
    AlignmentLogger,
    alignment,
    angle_and_norm_ratio,
    backprop_mode,
    floor_alignment,
    gradient_alignment,
)
from .node import FeedbackNode
from .optim import DecayBurst, param_groups
from .params import clip_grad_norm_, feedback_parameters, model_parameters
from .record import ConversionRecord, record_of
from .registry import feedback_modules, is_feedback_path
from .report import ConversionReport, report
from .rules import BP, DFA, FA, KP, PAL, PFA, PFAO, PRESETS, RULES, SF, WM, mirror, register_rule, step_feedback
from .sharding import units_gathered

__all__ = [
    "BP",
    "DFA",
    "FA",
    "KP",
    "PAL",
    "PFA",
    "PFAO",
    "PRESETS",
    "RULES",
    "SF",
    "WM",
    "AlignmentLogger",
    "ConversionError",
    "ConversionRecord",
    "ConversionReport",
    "ConversionTypeError",
    "ConvertedModule",
    "DecayBurst",
    "FeedbackNode",
    "RuleConfig",
    "TraceError",
    "alignment",
    "angle_and_norm_ratio",
    "backprop_mode",
    "clip_grad_norm_",
    "conversion_config",
    "convert",
    "counter_rng",
    "feedback_modules",
    "feedback_parameters",
    "floor_alignment",
    "gradient_alignment",
    "hf",
    "is_feedback_path",
    "mirror",
    "model_parameters",
    "op_names",
    "param_groups",
    "record_of",
    "register_rule",
    "report",
    "step_feedback",
    "units_gathered",
]
