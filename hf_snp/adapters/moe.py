"""Mixtures of experts (transformers 5.x): Mixtral, Qwen2-MoE, Qwen3-MoE (docs/design.md §5.4).

Each decoder layer has Llama's attention (``self_attn.{q,k,v,o}_proj``, GQA; Qwen2-MoE with q/k/v biases,
Qwen3-MoE with per-head q/k norms) and, in ``mlp``, a sparse MoE block: the router ``mlp.gate`` (weight [E, H],
``top_k``, ``num_experts``) and the routed experts ``mlp.experts``, one module with stacked ``gate_up_proj``
[E, 2I, H] and ``down_proj`` [E, H, I] (``num_experts``, ``intermediate_dim``). Qwen2-MoE adds
``mlp.shared_expert`` (a gated MLP with ``nn.Linear`` projections, width ``shared_expert_intermediate_size``)
whose output is scaled by ``sigmoid(mlp.shared_expert_gate(x))``. The Qwen families have dense layers where
``layer_idx in mlp_only_layers`` or ``(layer_idx + 1) % decoder_sparse_step != 0``: their ``mlp`` is a plain
gated MLP (width ``intermediate_size``), pruned as in the Llama family.

Targets: "mlp" (every routed expert's neurons, each expert a site of its own, the shared expert's and the dense
layers' neurons), "heads" (as the Llama family), "experts" (whole routed experts), "blocks". Config fields of a
uniform result: the expert width (Mixtral ``intermediate_size``, Qwen ``moe_intermediate_size``), the expert count
``num_experts`` (Mixtral's and Qwen3-MoE's ``attribute_map`` send it to ``num_local_experts``) and Qwen2-MoE's
``shared_expert_intermediate_size``.

The MoE block's output is not one consumer's (``mlp_is_consumer_output`` False: the second pass runs it again);
the attention returns ``(output, weights)`` and its output is replayed when no head is cut.
"""

from __future__ import annotations

import dataclasses

from torch import nn
from transformers import PretrainedConfig

from ..models.layouts import MOE_EXPERTS, QWEN2_MOE_EXPERTS
from ..models.modeling_hf_snp import ExpertsLayout, LayerShape
from ..units.experts import moe_sites
from ..units.protocols import Site
from ..units.sites import HeadSite, MlpSite
from .base import LlamaFamilyAdapter, register_adapter

EXPERT_FIELDS = ("expert_intermediate_size", "num_experts", "shared_expert_intermediate_size")


class MoEAdapter(LlamaFamilyAdapter):
    """A Llama-like decoder whose MLP is a sparse mixture of experts (``experts_layout``)."""

    family = "Mixture of experts"
    supported_targets = ("mlp", "heads", "blocks", "experts")
    mlp_is_consumer_output = False  # the MoE block sums several experts (and a shared expert)
    experts_layout: ExpertsLayout = MOE_EXPERTS
    expert_width_field = "moe_intermediate_size"
    shared_width_field: str | None = None
    has_dense_layers = True  # mlp_only_layers / decoder_sparse_step (the Qwen families)

    @property
    def shape_fields(self) -> dict[str, str]:
        fields = {"expert_intermediate_size": self.expert_width_field, "num_experts": "num_experts"}
        if self.shared_width_field is not None:
            fields["shared_expert_intermediate_size"] = self.shared_width_field
        return fields

    def is_moe_layer(self, config: PretrainedConfig, index: int) -> bool:
        """Layer ``index`` has the sparse MoE block (the rule of the family's decoder layer ``__init__``)."""
        if not self.has_dense_layers:
            return True
        sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
        return (index not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
                and (index + 1) % sparse_step == 0)

    def dense_layers(self, config: PretrainedConfig) -> list[int]:
        return [i for i in range(config.num_hidden_layers) if not self.is_moe_layer(config, i)]

    def layer_has(self, config: PretrainedConfig, index: int, field: str) -> bool:
        moe = self.is_moe_layer(config, index)
        if field == "intermediate_size":
            return not moe
        if field == "shared_expert_intermediate_size":
            return moe and self.shared_width_field is not None
        if field in EXPERT_FIELDS:
            return moe
        return True

    def layout(self, config: PretrainedConfig) -> dict:
        return {**super().layout(config), "experts": dataclasses.asdict(self.experts_layout)}

    def sites(self, layer: nn.Module, index: int, targets: tuple[str, ...], config: PretrainedConfig,
              gqa_mode: str) -> list[Site]:
        """Heads first, then the routed experts' neurons and the shared expert's (or a dense layer's MLP), then
        the set of experts."""
        sites: list[Site] = []
        if "heads" in targets:
            sites.append(HeadSite(layer, index, self.attention_layout, self.head_dim(config), gqa_mode))
        if self.experts_layout.block(layer) is not None:
            sites += moe_sites(layer, index, self.experts_layout, targets)
        elif "mlp" in targets:
            sites.append(MlpSite(layer, index, self.mlp))
        return sites

    def check_run(self, config, model_config: PretrainedConfig) -> None:
        """Refused before any work: global allocation of expert units (the experts of a layer would get different
        widths), ``add_bias=True`` or ``reconstruction_target='dense'`` with "mlp" (the stacked experts have no bias;
        routing differs between the dense and pruned models), "blocks" where dense and MoE
        layers mix, and an "experts" budget that would leave fewer experts than each token is routed to."""
        super().check_run(config, model_config)
        expert_targets = [t for t in ("mlp", "experts") if t in config.targets]
        if expert_targets and config.resolved_allocation == "global":
            raise ValueError(
                f"global allocation cannot prune {', '.join(expert_targets)} of a mixture of experts: the experts of "
                "a layer are stacked in one tensor that holds one width (and their count) per layer, and a global "
                "threshold would give each expert its own; use allocation='uniform' (with layer_sparsity for "
                "per-layer budgets), or prune targets=('heads',) globally")
        if "mlp" in config.targets and config.add_bias:
            raise ValueError(
                "add_bias=True cannot be honoured for a mixture of experts: the routed experts' down_proj is a "
                "stacked tensor with no bias and the stock experts implementations have no place for one (the shared "
                "expert's output is scaled by its gate), so no mean shift can be folded; leave add_bias unset "
                "(VBP then ranks by variance without the shift) or prune targets=('heads',) with add_bias=True")
        if "mlp" in config.targets and config.reconstruction_target == "dense":
            raise ValueError(
                "reconstruction_target='dense' cannot reconstruct routed experts: the router sends a token to other "
                "experts in the dense and the pruned model, so their units cannot be paired token by token "
                "(docs/design.md §3.7); use reconstruction_target='pruned', or prune targets=('heads',)")
        if "blocks" in config.targets and self.has_dense_layers and self.dense_layers(model_config):
            raise ValueError(
                f"cannot remove blocks of this {model_config.model_type} model: whether a layer is dense or a "
                "mixture of experts follows from its index (mlp_only_layers, decoder_sparse_step), and removing "
                f"blocks would renumber its dense layers {self.dense_layers(model_config)}; prune units instead")
        if "experts" in config.targets:
            self._check_expert_budget(config, model_config)

    def _check_expert_budget(self, config, model_config: PretrainedConfig) -> None:
        top_k = int(model_config.num_experts_per_tok)
        specs = getattr(model_config, "hf_snp_layers", None) or []
        for index in range(model_config.num_hidden_layers):
            if not self.is_moe_layer(model_config, index):
                continue
            shape = LayerShape.from_spec(specs[index]) if index < len(specs) else LayerShape()
            count = shape.num_experts or int(model_config.num_experts)
            if config.layer_sparsity and index in config.layer_sparsity:
                fraction = config.sparsity_of_layer(index)
            else:
                fraction = config.target_sparsity("experts")
            wanted = min(range(count + 1), key=lambda steps: (abs(steps - fraction * count), steps))
            if wanted > count - top_k:
                raise ValueError(
                    f"sparsity {fraction:.0%} of the experts of layer {index} would remove {wanted} of its {count} "
                    f"experts, but every token is routed to num_experts_per_tok={top_k} of them: at most "
                    f"{count - top_k} ({(count - top_k) / count:.0%}) can go; lower the sparsity of 'experts'")


class MixtralAdapter(MoEAdapter):
    family = "Mixtral"
    model_types = ("mixtral",)
    expert_width_field = "intermediate_size"  # MixtralExperts: intermediate_dim = config.intermediate_size
    has_dense_layers = False


class Qwen2MoEAdapter(MoEAdapter):
    family = "Qwen2-MoE"
    model_types = ("qwen2_moe",)
    experts_layout = QWEN2_MOE_EXPERTS
    shared_width_field = "shared_expert_intermediate_size"


class Qwen3MoEAdapter(MoEAdapter):
    family = "Qwen3-MoE"
    model_types = ("qwen3_moe",)


register_adapter(MixtralAdapter())
register_adapter(Qwen2MoEAdapter())
register_adapter(Qwen3MoEAdapter())
