"""ViT and DeiT (transformers 5.x): pre-LayerNorm encoder layers under ``vit.layers`` / ``deit.layers``,
``mlp.fc1`` / ``mlp.fc2`` with GELU, multi-head ``attention.q_proj/k_proj/v_proj/o_proj``; a CLS token
(and DeiT's distillation token) in front of the patch tokens. Statistics cover every token."""

from ..models.layouts import VIT_ATTENTION, VIT_MLP
from ..models.modeling_hf_snp import head_dim_of
from .base import ModelAdapter, register_adapter


class VisionTransformerAdapter(ModelAdapter):
    family = "ViT/DeiT"
    model_types = ("vit", "deit")
    layers_path = "{prefix}.layers"
    modality = "image"
    auto_class = "AutoModelForImageClassification"
    mlp = VIT_MLP
    attention_layout = VIT_ATTENTION
    mlp_width_field = "intermediate_size"
    stock_head_pruning = True  # the attention reads num_attention_heads and an explicit head_dim

    def set_uniform_heads(self, config, num_heads: int, num_kv_heads: int) -> None:
        config.head_dim = head_dim_of(config)
        config.num_attention_heads = num_heads

    def tokens_per_sample(self, config) -> int:
        size, patch = config.image_size, config.patch_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
        special = 2 if config.model_type.removeprefix("hf_snp_") == "deit" else 1  # CLS (+ distillation)
        return (size[0] // patch[0]) * (size[1] // patch[1]) + special


register_adapter(VisionTransformerAdapter())
