"""Prune, then quantize: the pruned model goes through transformers' torchao integration unchanged.

The pruned model (stock class or hf_snp type) is written to a scratch directory in safetensors and loaded back with
``from_pretrained(..., quantization_config=TorchAoConfig(scheme))``, the path any user of a pruned checkpoint would
take; the result saves with ``save_pretrained`` and loads with ``from_pretrained`` where torchao is installed.
"""

from __future__ import annotations

import importlib.util
import tempfile

import torch
from transformers import PreTrainedModel

from ..config import QUANTIZATIONS
from .speed import weight_bytes


def require_torchao(scheme: str) -> None:
    """Refuse ``quantize=scheme`` before any work when torchao is missing."""
    if importlib.util.find_spec("torchao") is None:
        raise ImportError(f"quantize={scheme!r} needs torchao: pip install 'hf_snp[quantize]' (or pip install torchao)")


def torchao_config(scheme: str):
    """The torchao config of a scheme name (``QUANTIZATIONS``)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    configs = {"int8_weight_only": Int8WeightOnlyConfig, "int8_dynamic": Int8DynamicActivationInt8WeightConfig}
    if scheme not in configs:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {list(QUANTIZATIONS)}")
    return configs[scheme]()


def quantize_pruned(model: PreTrainedModel, scheme: str) -> PreTrainedModel:
    """``model`` reloaded through transformers with torchao's ``scheme`` applied to its linear layers."""
    import transformers
    from transformers import TorchAoConfig

    from ..adapters.base import get_adapter

    auto = getattr(transformers, get_adapter(model.config).auto_class)
    with tempfile.TemporaryDirectory(prefix="hf_snp_quantize_") as scratch:
        model.save_pretrained(scratch)  # hf_snp types load through the Auto classes hf_snp registered
        quantized = auto.from_pretrained(scratch, dtype=model.dtype,
                                         quantization_config=TorchAoConfig(torchao_config(scheme)))
    if not any(type(module.weight).__module__.startswith("torchao") for module in quantized.modules()
               if isinstance(module, torch.nn.Linear)):
        raise RuntimeError(f"torchao's {scheme} quantized none of the model's linear layers")
    return quantized.eval()


def quantize_result(result, scheme: str) -> None:
    """Replace ``result.model`` (a PruneResult's) by its ``scheme`` quantization; the report records the scheme,
    torchao's version and the weight bytes before and after."""
    import torchao

    before = weight_bytes(result.model)
    result.model = quantize_pruned(result.model, scheme)
    result.report["quantization"] = {"scheme": scheme, "library": f"torchao {torchao.__version__}",
                                     "weight_bytes_before": before, "weight_bytes_after": weight_bytes(result.model)}
