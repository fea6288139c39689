"""Llama-like decoders: gated MLP (``mlp.{gate,up,down}_proj``), ``self_attn.{q,k,v,o}_proj``, GQA, rotary embeddings.

Llama, Mistral, Qwen2, SmolLM, and with the same linears: Qwen3 and Gemma 3 (per-head q/k RMSNorm over
``head_dim``, shared by every head, so cutting heads leaves it as it is), Gemma, Gemma 2 and Gemma 3 (explicit
``head_dim``, norms after the attention and MLP modules, logit soft-capping, sliding windows), Granite (embedding,
attention, residual and logit multipliers) and SmolLM3 (layers without rotary embeddings). In all of them the
attention module returns ``(output, weights)``, the MLP module returns ``down_proj``'s output, and the attention
reads its head counts from ``head_dim`` and ``num_key_value_groups`` (``AttentionLayout.set_head_counts``).

OLMo 2 has the same linears, but its q/k norms normalise the whole projection (``num_heads * head_dim``): its
heads are cut with their entries of the norms' weights, and the kept weights are rescaled for the RMS the removed
heads no longer add to (``hf_snp.units.qk_norm``, docs/design.md §5.5).
"""

from torch import nn
from transformers import PretrainedConfig

from ..models.layouts import OLMO2_ATTENTION
from ..units.protocols import Site
from ..units.qk_norm import QKNormHeadSite
from .base import LlamaFamilyAdapter, register_adapter


class OLMo2Adapter(LlamaFamilyAdapter):
    """OLMo 2: Llama's linears, norms after the attention and MLP modules, and q/k RMSNorms over the whole
    projection (``OLMO2_ATTENTION``). Its head sites are ``QKNormHeadSite``: ``qk_norm_correction`` (default True)
    fits the kept norm weights' scale on the calibration tokens; False only cuts them (the benchmark's ablation)."""

    family = "OLMo 2"
    model_types = ("olmo2",)
    attention_layout = OLMO2_ATTENTION
    qk_norm_correction = True

    def sites(self, layer: nn.Module, index: int, targets: tuple[str, ...], config: PretrainedConfig,
              gqa_mode: str) -> list[Site]:
        sites = super().sites(layer, index, targets, config, gqa_mode)
        for position, site in enumerate(sites):
            if site.kind == "heads":
                head_site = QKNormHeadSite(layer, index, self.attention_layout, self.head_dim(config), gqa_mode,
                                           correct=self.qk_norm_correction)
                head_site.post_norm = getattr(site, "post_norm", None)  # whatever the base adapter found after o_proj
                sites[position] = head_site
        return sites


register_adapter(LlamaFamilyAdapter())
register_adapter(OLMo2Adapter())
