"""Llama family: Llama, Mistral, Qwen2, SmolLM (gated MLP, GQA, RMSNorm, rotary embeddings)."""

from ..models.modeling_hf_snp import LLAMA_ATTENTION, LLAMA_MLP, head_dim_of
from .base import ModelAdapter, register_adapter


class LlamaFamilyAdapter(ModelAdapter):
    family = "Llama family"
    model_types = ("llama", "mistral", "qwen2")
    layers_path = "model.layers"
    mlp = LLAMA_MLP
    attention_layout = LLAMA_ATTENTION
    mlp_width_field = "intermediate_size"
    stock_head_pruning = True  # num_attention_heads / num_key_value_heads with an explicit head_dim

    def set_uniform_heads(self, config, num_heads: int, num_kv_heads: int) -> None:
        config.head_dim = head_dim_of(config)  # explicit: hidden_size // heads no longer holds
        config.num_attention_heads = num_heads
        config.num_key_value_heads = num_kv_heads


register_adapter(LlamaFamilyAdapter())
