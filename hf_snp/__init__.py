"""hf_snp: one-shot structured pruning of Hugging Face models (SNP and VBP).

The public names load on first use (PEP 562), so ``import hf_snp`` and ``hf-snp --help`` import neither
torch nor transformers. Saved checkpoints of hf_snp's variable-width type still load after a plain
``import hf_snp``: the first time transformers looks up an ``hf_snp_*`` model type, hf_snp.adapters is
imported, which registers the types with the Auto classes (``_register_on_lookup``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # the same names, for type checkers and tools/import_map.py
    from .adapters import ModelAdapter, get_adapter, register_adapter, supported_families
    from .api import PruneResult, prune
    from .config import PruneConfig
    from .deliver.report import PruneReport
    from .evaluation.accuracy import evaluate_accuracy
    from .evaluation.harness import lm_eval
    from .evaluation.perplexity import perplexity
    from .evaluation.reference import DenseReference, evaluate
    from .methods import register_method
    from .models.modeling_hf_snp import AttentionLayout, MlpLayout
    from .setup.calibration import CalibrationData, load_calibration
    from .setup.images import ImageCalibrationData
    from .units.sites import count_parameters

# public name -> the module that defines it
_EXPORTS = {
    "prune": ".api", "PruneResult": ".api", "PruneConfig": ".config", "PruneReport": ".deliver.report",
    "perplexity": ".evaluation.perplexity", "evaluate_accuracy": ".evaluation.accuracy",
    "lm_eval": ".evaluation.harness", "evaluate": ".evaluation.reference", "DenseReference": ".evaluation.reference",
    "CalibrationData": ".setup.calibration", "load_calibration": ".setup.calibration",
    "ImageCalibrationData": ".setup.images", "count_parameters": ".units.sites", "get_adapter": ".adapters",
    "register_adapter": ".adapters", "ModelAdapter": ".adapters", "supported_families": ".adapters",
    "MlpLayout": ".models.modeling_hf_snp", "AttentionLayout": ".models.modeling_hf_snp",
    "register_method": ".methods",
}

__all__ = [
    "__version__", "prune", "PruneResult", "PruneConfig", "PruneReport", "perplexity", "evaluate_accuracy",
    "ImageCalibrationData", "lm_eval", "CalibrationData", "load_calibration", "count_parameters", "get_adapter",
    "register_adapter", "ModelAdapter", "MlpLayout", "AttentionLayout", "register_method", "supported_families",
    "evaluate", "DenseReference",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_snp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _QuietThirdParty(logging.Filter):
    """Drops three messages that torchao and torch log on every import of transformers' quantizers, and nothing
    else: torchao's "Failed to load <its optional kernels>.so" and "Detected no triton" (on CPU machines), and
    torch's deprecation of register_constant() on Enum subclasses (torchao's)."""

    MESSAGES = {"torchao": ("Failed to load ", ".so"), "torchao.kernel.intmm": ("Detected no triton", ""),
                "torch.utils._pytree": ("is an Enum subclass and is now natively supported", "")}

    def filter(self, record: logging.LogRecord) -> bool:
        text, also = self.MESSAGES.get(record.name, ("", ""))
        message = record.getMessage()
        return not (text and text in message and also in message)


for _logger in _QuietThirdParty.MESSAGES:
    logging.getLogger(_logger).addFilter(_QuietThirdParty())


class _RegisterOnLookup(dict):
    """transformers' registered config types (``CONFIG_MAPPING._extra_content``): looking up an ``hf_snp_*``
    model type that is not there yet imports hf_snp.adapters, which registers hf_snp's variable-width types."""

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str) and key.startswith("hf_snp_") and not dict.__contains__(self, key):
            _register_types()
        return dict.__contains__(self, key)


def _register_types() -> None:
    if "hf_snp.adapters" not in sys.modules:
        from . import adapters  # noqa: F401  (registers every family's hf_snp_<model_type>)


def _register_on_lookup(configuration_auto: Any) -> None:
    """Make transformers' AutoConfig register hf_snp's types when it first meets one (see the module docstring)."""
    mapping = getattr(configuration_auto, "CONFIG_MAPPING", None)
    extra = getattr(mapping, "_extra_content", None)
    if isinstance(extra, dict) and not isinstance(extra, _RegisterOnLookup):
        mapping._extra_content = _RegisterOnLookup(extra)


class _AfterImport:
    """A one-shot import hook: runs ``callback(module)`` once ``name`` has been imported."""

    def __init__(self, name: str, callback: Any):
        self.name, self.callback, self.loader = name, callback, None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name or self.loader is not None:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        self.callback(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        loader = self.__dict__.get("loader")
        if loader is None:
            raise AttributeError(name)
        return getattr(loader, name)


_CONFIGURATION_AUTO = "transformers.models.auto.configuration_auto"
if _CONFIGURATION_AUTO in sys.modules:
    _register_on_lookup(sys.modules[_CONFIGURATION_AUTO])
else:
    sys.meta_path.insert(0, _AfterImport(_CONFIGURATION_AUTO, _register_on_lookup))
