"""Families with fused projections or transposed weights, described by the layout vocabulary
(``MlpLayout.producer_blocks`` / ``conv1d``, ``AttentionLayout.qkv`` / ``conv1d`` / ``config_heads``; the layouts
themselves are declared in ``hf_snp.models.layouts``).

* Phi-3 (``modeling_phi3``): ``self_attn.qkv_proj`` holds every query head's rows, then every key head's, then every
  value head's (``qkv[..., :num_heads * head_dim]`` / next ``num_kv_heads * head_dim`` / the rest), GQA allowed;
  ``mlp.gate_up_proj`` is [gate; up] (``chunk(2, dim=-1)``), ``mlp.down_proj`` the consumer. The attention splits
  ``qkv`` at ``self.config.num_attention_heads * head_dim`` in forward, so a pruned attention gets its own view of
  the config (``config_heads``). ``head_dim`` is read with ``getattr(config, "head_dim", ...)`` by the attention
  and the rotary embedding, so fewer uniform heads are a stock config with an explicit ``head_dim``.
* GPT-NeoX (``modeling_gpt_neox``): ``attention.query_key_value`` output is viewed as
  ``(..., heads, 3 * head_size)`` and chunked into q, k, v: rows [q_0; k_0; v_0; q_1; ...] per head
  (``qkv="per_head"``), multi-head only; ``attention.dense``; ``mlp.dense_h_to_4h`` / ``dense_4h_to_h``. The
  attention reads no head count (``view(..., -1, 3 * head_size)``), but ``head_size`` is
  ``hidden_size // num_attention_heads`` in ``__init__``, so fewer heads need the hf_snp type. With
  ``use_parallel_residual`` the MLP reads the block input, not the attention output: replaying the attention
  (MLP-only cuts) and the MLP's consumer still gives the same block output.
* GPT-2 (``modeling_gpt2``): every projection is a transformers ``Conv1D`` (weight [in, out]); ``attn.c_attn``'s
  output is split by ``split_size`` into q, k, v (``qkv="blocks"``), each viewed as ``(..., -1, head_dim)``;
  ``attn.c_proj``; ``mlp.c_fc`` / ``mlp.c_proj``. ``head_dim`` is ``n_embd // n_head`` in ``__init__``, so fewer
  heads need the hf_snp type; the MLP width is ``n_inner`` (None = ``4 * n_embd``). Only the self-attention is
  pruned (a ``crossattention`` is left as it is).

In all three the block reads only the first element of the attention's ``(output, weights)``, and the MLP module
returns its consumer's output (GPT-2's ``resid_dropout`` / MLP ``dropout`` are identities in eval mode).
"""

from ..models.layouts import (
    GPT2_ATTENTION,
    GPT2_MLP,
    GPT_NEOX_ATTENTION,
    GPT_NEOX_MLP,
    PHI3_ATTENTION,
    PHI3_MLP,
)
from ..models.modeling_hf_snp import head_dim_of
from .base import ModelAdapter, register_adapter


class Phi3Adapter(ModelAdapter):
    family = "Phi-3"
    model_types = ("phi3",)
    layers_path = "model.layers"
    mlp = PHI3_MLP
    attention_layout = PHI3_ATTENTION
    mlp_width_field = "intermediate_size"
    stock_head_pruning = True  # num_attention_heads / num_key_value_heads with an explicit head_dim

    def set_uniform_heads(self, config, num_heads: int, num_kv_heads: int) -> None:
        config.head_dim = head_dim_of(config)  # explicit: hidden_size // heads no longer holds
        config.num_attention_heads = num_heads
        config.num_key_value_heads = num_kv_heads


class GPTNeoXAdapter(ModelAdapter):
    family = "GPT-NeoX"
    model_types = ("gpt_neox",)
    layers_path = "{prefix}.layers"
    mlp = GPT_NEOX_MLP
    attention_layout = GPT_NEOX_ATTENTION
    mlp_width_field = "intermediate_size"
    stock_head_pruning = False  # GPTNeoXAttention: head_size = hidden_size // num_attention_heads


class GPT2Adapter(ModelAdapter):
    family = "GPT-2"
    model_types = ("gpt2",)
    layers_path = "{prefix}.h"
    mlp = GPT2_MLP
    attention_layout = GPT2_ATTENTION
    mlp_width_field = "n_inner"  # None in most configs: 4 * n_embd
    stock_head_pruning = False  # GPT2Attention: head_dim = n_embd // n_head


register_adapter(Phi3Adapter())
register_adapter(GPTNeoXAdapter())
register_adapter(GPT2Adapter())
