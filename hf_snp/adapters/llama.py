"""Llama family: Llama, Mistral, Qwen2, SmolLM (gated MLP, GQA, RMSNorm, rotary embeddings)."""

from ..models.modeling_hf_snp import LLAMA_MLP
from .base import ModelAdapter, register_adapter


class LlamaFamilyAdapter(ModelAdapter):
    family = "Llama family"
    model_types = ("llama", "mistral", "qwen2")
    layers_path = "model.layers"
    mlp = LLAMA_MLP
    mlp_width_field = "intermediate_size"


register_adapter(LlamaFamilyAdapter())
