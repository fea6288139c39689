"""hf_snp: one-shot structured pruning of Hugging Face models (SNP and VBP)."""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (the variable-width type; the adapters register it per family)
from .accuracy import evaluate_accuracy  # noqa: E402
from .adapters import ModelAdapter, get_adapter, register_adapter, supported_families  # noqa: E402
from .api import PruneResult, prune  # noqa: E402
from .calibration import CalibrationData, load_calibration  # noqa: E402
from .config import PruneConfig  # noqa: E402
from .evaluation import perplexity  # noqa: E402
from .harness import lm_eval  # noqa: E402
from .images import ImageCalibrationData  # noqa: E402
from .methods import register_method  # noqa: E402
from .models.modeling_hf_snp import AttentionLayout, MlpLayout  # noqa: E402
from .report import PruneReport  # noqa: E402
from .sites import count_parameters  # noqa: E402

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
