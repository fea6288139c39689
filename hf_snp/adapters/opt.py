"""OPT: fc1/fc2 with biases, ReLU, LayerNorm, learned positions; multi-head attention."""

from ..models.layouts import OPT_ATTENTION, OPT_MLP
from .base import ModelAdapter, register_adapter


class OPTAdapter(ModelAdapter):
    family = "OPT"
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    mlp = OPT_MLP
    attention_layout = OPT_ATTENTION
    mlp_width_field = "ffn_dim"
    stock_head_pruning = False  # OPTAttention derives head_dim from hidden_size // num_attention_heads
    mlp_is_consumer_output = False  # fc1/fc2 sit in the decoder layer itself, with no MLP module to replay


register_adapter(OPTAdapter())
