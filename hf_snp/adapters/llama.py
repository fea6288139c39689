"""Llama-like decoders: gated MLP (``mlp.{gate,up,down}_proj``), ``self_attn.{q,k,v,o}_proj``, GQA, rotary embeddings.

Llama, Mistral, Qwen2, SmolLM, and with the same linears: Qwen3 and Gemma 3 (per-head q/k RMSNorm over
``head_dim``, shared by every head, so cutting heads leaves it as it is), Gemma, Gemma 2 and Gemma 3 (explicit
``head_dim``, norms after the attention and MLP modules, logit soft-capping, sliding windows), Granite (embedding,
attention, residual and logit multipliers) and SmolLM3 (layers without rotary embeddings). In all of them the
attention module returns ``(output, weights)``, the MLP module returns ``down_proj``'s output, and the attention
reads its head counts from ``head_dim`` and ``num_key_value_groups`` (``AttentionLayout.set_head_counts``).

OLMo 2 has the same linears, but its q/k norms normalise the whole projection (``num_heads * head_dim``): its
MLP is pruned like Llama's, its heads are refused (``OLMo2Adapter``).
"""

from torch import nn
from transformers import PretrainedConfig

from ..units.protocols import Site
from .base import LlamaFamilyAdapter, register_adapter

OLMO2_HEADS_REFUSED = (
    "hf_snp cannot prune OLMo 2 attention heads: its q_norm/k_norm normalise each token's query and key over all "
    "heads together (num_heads * head_dim), so removing a head changes the kept heads' attention and cannot be "
    "compensated; prune targets=('mlp',) (or 'blocks') instead"
)


class OLMo2Adapter(LlamaFamilyAdapter):
    """OLMo 2: Llama's linears, norms after the attention and MLP modules, and q/k RMSNorms over the whole
    projection. Removing a head would change how every kept head is normalised (and cut the norms' weights),
    so only MLP neurons (and whole blocks) are pruned; heads are refused before any work."""

    family = "OLMo 2"
    model_types = ("olmo2",)
    stock_head_pruning = False
    supported_targets = ("mlp", "blocks")

    def check_targets(self, targets: tuple[str, ...]) -> None:
        if "heads" in targets:
            raise ValueError(OLMO2_HEADS_REFUSED)
        super().check_targets(targets)

    def sites(self, layer: nn.Module, index: int, targets: tuple[str, ...], config: PretrainedConfig,
              gqa_mode: str) -> list[Site]:
        if "heads" in targets:  # preflight builds the sites on the meta model: still before any work
            raise ValueError(OLMO2_HEADS_REFUSED)
        return super().sites(layer, index, targets, config, gqa_mode)


register_adapter(LlamaFamilyAdapter())
register_adapter(OLMo2Adapter())
