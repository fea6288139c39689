"""hf_snp: one-shot structured pruning of Hugging Face models (SNP and VBP)."""

from . import models  # noqa: F401  (the variable-width type; the adapters register it per family)
from .adapters import ModelAdapter, get_adapter, register_adapter, supported_families
from .api import PruneResult, prune
from .config import PruneConfig
from .deliver.report import PruneReport
from .evaluation.accuracy import evaluate_accuracy
from .evaluation.harness import lm_eval
from .evaluation.perplexity import perplexity
from .methods import register_method
from .models.modeling_hf_snp import AttentionLayout, MlpLayout
from .setup.calibration import CalibrationData, load_calibration
from .setup.images import ImageCalibrationData
from .units.sites import count_parameters
from .version import __version__

__all__ = [
    "__version__",
    "prune",
    "PruneResult",
    "PruneConfig",
    "PruneReport",
    "perplexity",
    "evaluate_accuracy",
    "ImageCalibrationData",
    "lm_eval",
    "CalibrationData",
    "load_calibration",
    "count_parameters",
    "get_adapter",
    "register_adapter",
    "ModelAdapter",
    "MlpLayout",
    "AttentionLayout",
    "register_method",
    "supported_families",
]
