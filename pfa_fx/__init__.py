"""pfa_fx: train any PyTorch model with credit-assignment rules that avoid weight symmetry.

``pfa_fx.convert(model, rule="pfa")`` rewrites every weight op of a model (a torch.fx
pass) into a feedback-aware op: identical forward, backward through the rule's feedback
weights. Rules: ``bp``, ``fa``, ``dfa``, ``sf``, ``kp``, ``wm``, ``pal``, ``pfa``, ``pfa-o``.
"""

from . import hf
from .checkpoint import conversion_config
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
from .node import FeedbackNode, units_gathered
from .optim import DecayBurst, param_groups
from .params import clip_grad_norm_, feedback_parameters, model_parameters
from .registry import feedback_modules, is_feedback_path
from .report import ConversionReport, report
from .rules import RULES, mirror, step_feedback

__version__ = "0.1.0"

__all__ = [
    "RULES",
    "AlignmentLogger",
    "ConversionError",
    "ConversionReport",
    "ConversionTypeError",
    "ConvertedModule",
    "DecayBurst",
    "FeedbackNode",
    "TraceError",
    "alignment",
    "angle_and_norm_ratio",
    "backprop_mode",
    "clip_grad_norm_",
    "conversion_config",
    "convert",
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
    "report",
    "step_feedback",
    "units_gathered",
]
