"""hf_snp's variable-width model types.

Each class subclasses a stock transformers class and only resizes per-layer modules after
the stock ``__init__``: the weights keep the stock key names. This file travels with every
checkpoint saved in the hf_snp format (``register_for_auto_class``), so it must import
nothing but torch and transformers: ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` works where hf_snp is not installed.

``config.hf_snp_layers`` holds one dict per decoder layer. Known keys (missing = stock):

* ``intermediate_size``: MLP width of that layer.
* ``mlp_output_bias``: the MLP output projection has a bias (added by mean-shift folding).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)


@dataclass(frozen=True)
class MlpLayout:
    """Where a family's MLP lives inside one decoder layer."""

    parent: str  # submodule holding the linears ("" = the layer itself)
    producers: tuple[str, ...]  # linears whose output rows are the MLP units
    consumer: str  # linear whose input columns are the MLP units


LLAMA_MLP = MlpLayout("mlp", ("gate_proj", "up_proj"), "down_proj")
OPT_MLP = MlpLayout("", ("fc1",), "fc2")


def _new_linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_mlp(layer: nn.Module, layout: MlpLayout, width: int | None, output_bias: bool) -> None:
    """Replace one layer's MLP linears by empty ones of ``width`` units (weights load later)."""
    parent = layer.get_submodule(layout.parent) if layout.parent else layer
    if width is not None:
        for name in layout.producers:
            old = getattr(parent, name)
            setattr(parent, name, _new_linear(old, old.in_features, width, old.bias is not None))
        if hasattr(parent, "intermediate_size"):
            parent.intermediate_size = width
    consumer = getattr(parent, layout.consumer)
    in_features = consumer.in_features if width is None else width
    bias = output_bias or consumer.bias is not None
    if in_features != consumer.in_features or bias != (consumer.bias is not None):
        setattr(parent, layout.consumer, _new_linear(consumer, in_features, consumer.out_features, bias))


def apply_layer_specs(layers: nn.ModuleList, specs: list[dict] | None, mlp: MlpLayout) -> None:
    """Resize every decoder layer to its entry of ``config.hf_snp_layers``."""
    if not specs:
        return
    if len(specs) != len(layers):
        raise ValueError(f"hf_snp_layers has {len(specs)} entries for {len(layers)} decoder layers")
    for layer, spec in zip(layers, specs):
        resize_mlp(layer, mlp, spec.get("intermediate_size"), bool(spec.get("mlp_output_bias", False)))


class HfSnpLlamaConfig(LlamaConfig):
    model_type = "hf_snp_llama"
    hf_snp_layers: list | None = None


class HfSnpLlamaForCausalLM(LlamaForCausalLM):
    config_class = HfSnpLlamaConfig

    def __init__(self, config: HfSnpLlamaConfig):
        super().__init__(config)
        apply_layer_specs(self.model.layers, config.hf_snp_layers, LLAMA_MLP)


class HfSnpMistralConfig(MistralConfig):
    model_type = "hf_snp_mistral"
    hf_snp_layers: list | None = None


class HfSnpMistralForCausalLM(MistralForCausalLM):
    config_class = HfSnpMistralConfig

    def __init__(self, config: HfSnpMistralConfig):
        super().__init__(config)
        apply_layer_specs(self.model.layers, config.hf_snp_layers, LLAMA_MLP)


class HfSnpQwen2Config(Qwen2Config):
    model_type = "hf_snp_qwen2"
    hf_snp_layers: list | None = None


class HfSnpQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = HfSnpQwen2Config

    def __init__(self, config: HfSnpQwen2Config):
        super().__init__(config)
        apply_layer_specs(self.model.layers, config.hf_snp_layers, LLAMA_MLP)


class HfSnpOPTConfig(OPTConfig):
    model_type = "hf_snp_opt"
    hf_snp_layers: list | None = None


class HfSnpOPTForCausalLM(OPTForCausalLM):
    config_class = HfSnpOPTConfig

    def __init__(self, config: HfSnpOPTConfig):
        super().__init__(config)
        apply_layer_specs(self.model.decoder.layers, config.hf_snp_layers, OPT_MLP)


# stock model_type -> (hf_snp config class, hf_snp causal-LM class)
CAUSAL_LM_TYPES = {
    "llama": (HfSnpLlamaConfig, HfSnpLlamaForCausalLM),
    "mistral": (HfSnpMistralConfig, HfSnpMistralForCausalLM),
    "qwen2": (HfSnpQwen2Config, HfSnpQwen2ForCausalLM),
    "opt": (HfSnpOPTConfig, HfSnpOPTForCausalLM),
}
