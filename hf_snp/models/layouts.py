"""Where each family's prunable modules live, declared once: the adapters (``hf_snp.adapters``) point at these.

The vocabulary (``MlpLayout``, ``AttentionLayout``, ``ExpertsLayout``) is in ``modeling_hf_snp``, which travels
with saved checkpoints; a saved checkpoint carries its layout as data (``config.hf_snp_layout``), so these
constants are hf_snp's own and this module is not copied. What the fused and transposed layouts mean for each
family is told in ``hf_snp.adapters.fused``.
"""

from __future__ import annotations

import dataclasses

from .modeling_hf_snp import AttentionLayout, ExpertsLayout, MlpLayout

# Llama family (and the MoE families' dense layers): act(gate_proj) * up_proj -> down_proj
LLAMA_MLP = MlpLayout("mlp", ("gate_proj", "up_proj"), "down_proj")
LLAMA_ATTENTION = AttentionLayout("self_attn", "q_proj", "k_proj", "v_proj", "o_proj")
# OLMo 2: Llama's linears, and q/k RMSNorms over the whole projections (one weight entry per row)
OLMO2_ATTENTION = dataclasses.replace(LLAMA_ATTENTION, q_norm="q_norm", k_norm="k_norm")
# OPT: fc1/fc2 in the decoder layer itself
OPT_MLP = MlpLayout("", ("fc1",), "fc2")
OPT_ATTENTION = AttentionLayout("self_attn", "q_proj", "k_proj", "v_proj", "out_proj")
# ViT / DeiT (transformers 5.x)
VIT_MLP = MlpLayout("mlp", ("fc1",), "fc2")
VIT_ATTENTION = AttentionLayout("attention", "q_proj", "k_proj", "v_proj", "o_proj")
# Phi-3: [gate; up] in one producer, q/k/v rows in blocks, head counts read from the config in forward
PHI3_MLP = MlpLayout("mlp", ("gate_up_proj",), "down_proj", producer_blocks=2)
PHI3_ATTENTION = AttentionLayout("self_attn", "qkv_proj", "qkv_proj", "qkv_proj", "o_proj", qkv="blocks",
                                 config_heads=True)
# GPT-NeoX: q/k/v rows head by head
GPT_NEOX_MLP = MlpLayout("mlp", ("dense_h_to_4h",), "dense_4h_to_h")
GPT_NEOX_ATTENTION = AttentionLayout("attention", "query_key_value", "query_key_value", "query_key_value", "dense",
                                     qkv="per_head")
# GPT-2: transformers Conv1D modules (weight [in, out]), q/k/v rows in blocks
GPT2_MLP = MlpLayout("mlp", ("c_fc",), "c_proj", conv1d=True)
GPT2_ATTENTION = AttentionLayout("attn", "c_attn", "c_attn", "c_attn", "c_proj", qkv="blocks", conv1d=True)
# mixtures of experts (transformers 5.x): Mixtral and Qwen3-MoE; Qwen2-MoE adds a Llama-style gated shared expert
MOE_EXPERTS = ExpertsLayout()
QWEN2_MOE_EXPERTS = ExpertsLayout(shared=dataclasses.replace(LLAMA_MLP, parent="mlp.shared_expert"))
