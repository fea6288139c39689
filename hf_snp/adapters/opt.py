"""OPT: fc1/fc2 with biases, ReLU, LayerNorm, learned positions."""

from ..models.modeling_hf_snp import OPT_MLP
from .base import ModelAdapter, register_adapter


class OPTAdapter(ModelAdapter):
    family = "OPT"
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    mlp = OPT_MLP
    mlp_width_field = "ffn_dim"


register_adapter(OPTAdapter())
