"""Per-architecture adapters: where the blocks and prunable sites of a family live.

The engine and the methods only talk to an adapter and its sites; they never test model classes.
"""

from __future__ import annotations

import dataclasses

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..models import head_dim_of, register_variable_width_types
from ..models.layouts import LLAMA_ATTENTION, LLAMA_MLP
from ..models.modeling_hf_snp import AttentionLayout, MlpLayout
from ..units.protocols import Site
from ..units.sites import HeadSite, MlpSite


class ModelAdapter:
    """Describes one model family. Subclasses fill in the class attributes."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    layers_path: str = ""  # dotted path of the transformer-layer ModuleList ("{prefix}": base_model_prefix)
    modality: str = "text"  # what calibration feeds the model: "text" (token ids) or "image" (pixel values)
    auto_class: str = "AutoModelForCausalLM"  # the transformers Auto class that loads the family
    mlp: MlpLayout
    attention_layout: AttentionLayout
    mlp_width_field: str = ""  # config field holding the (uniform) MLP width
    stock_head_pruning: bool = False  # can the stock config express fewer (uniform) heads?
    # what the second pass may replay (hf_snp.passes.replay): the attention returns (output, weights) and the
    # block reads nothing else of it; the MLP is a module whose output is its consumer's output
    attention_returns_pair: bool = True
    mlp_is_consumer_output: bool = True
    supported_targets: tuple[str, ...] = ("mlp", "heads", "blocks")  # what may be pruned ("experts" for MoE)
    # LayerShape width fields beyond the MLP width and head counts -> the stock config field holding their uniform
    # value (mixtures of experts: the expert width and count)
    shape_fields: dict[str, str] = {}
    # text model types whose layers normalise a site's consumer output (Gemma 2/3, OLMo 2), and where that norm is,
    # by site kind: SNP weighs the output error by it (docs/design.md §3.11)
    post_norm_types: tuple[str, ...] = ()
    post_norm_names: dict[str, str] = {"mlp": "post_feedforward_layernorm", "heads": "post_attention_layernorm"}
    # where the final norm after the last block may be found (``final_norm``)
    final_norm_names: tuple[str, ...] = ("norm", "final_layer_norm", "final_layernorm", "ln_f", "layernorm", "norm_f")

    def layers_path_of(self, model: PreTrainedModel) -> str:
        return self.layers_path.format(prefix=getattr(model, "base_model_prefix", ""))

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.get_submodule(self.layers_path_of(model))

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        """The norm applied to the last block's outputs (``nn.Identity`` when the model has none): the nearest
        module named in ``final_norm_names`` on the way up from the layer list."""
        parts = self.layers_path_of(model).split(".")
        for depth in range(len(parts) - 1, -1, -1):
            parent = model.get_submodule(".".join(parts[:depth]))
            for name in self.final_norm_names:
                if isinstance(getattr(parent, name, None), nn.Module):
                    return getattr(parent, name)
        return nn.Identity()

    def tokens_per_sample(self, config: PretrainedConfig) -> int | None:
        """Tokens one calibration sample holds when the family fixes it (images); None for text."""
        return None

    def shape_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """The config holding the decoder layers' stock shapes (head counts, widths, per-layer fields): the model's
        own, or its language model's for a vision-language wrapper. ``hf_snp_layers`` stays on the model's."""
        return config

    def head_dim(self, config: PretrainedConfig) -> int:
        return head_dim_of(self.shape_config(config))

    def layout(self, config: PretrainedConfig) -> dict:
        """Where the modules live, as data for the variable-width type (``config.hf_snp_layout``)."""
        return {"layers": self.layers_path, "mlp": dataclasses.asdict(self.mlp),
                "attention": dataclasses.asdict(self.attention_layout), "head_dim": self.head_dim(config)}

    def sites(self, layer: nn.Module, index: int, targets: tuple[str, ...], config: PretrainedConfig,
              gqa_mode: str) -> list[Site]:
        """The prunable sites of one layer for the requested targets (attention first)."""
        sites: list[Site] = []
        if "heads" in targets:
            sites.append(HeadSite(layer, index, self.attention_layout, self.head_dim(config), gqa_mode))
        if "mlp" in targets:
            sites.append(MlpSite(layer, index, self.mlp))
        return self.with_post_norms(layer, sites, config)

    def with_post_norms(self, layer: nn.Module, sites: list[Site], config: PretrainedConfig) -> list[Site]:
        """``sites`` with the norm that follows each one's consumer output, for the families that have one."""
        if self.shape_config(config).model_type in self.post_norm_types:
            for site in sites:
                name = self.post_norm_names.get(site.kind)
                site.post_norm = None if name is None else getattr(layer, name, None)
        return sites

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention submodule (its output is replayed from cache when it is not pruned)."""
        return layer.get_submodule(self.attention_layout.parent)

    def set_uniform_mlp_width(self, config: PretrainedConfig, width: int) -> None:
        setattr(self.shape_config(config), self.mlp_width_field, width)

    def set_uniform_heads(self, config: PretrainedConfig, num_heads: int, num_kv_heads: int) -> None:
        """Fewer heads in every layer in the stock fields (used when ``stock_head_pruning``): an explicit
        ``head_dim``, since hidden_size // heads no longer holds."""
        config = self.shape_config(config)
        config.head_dim = head_dim_of(config)
        config.num_attention_heads = num_heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = num_kv_heads

    def layer_has(self, config: PretrainedConfig, index: int, field: str) -> bool:
        """Whether layer ``index`` has the LayerShape width ``field`` (a dense MLP width, an expert count...): the
        stock config holds a width when it is the same in every layer that has it."""
        return True

    def check_run(self, config, model_config: PretrainedConfig) -> None:
        """Refuse what this family cannot do with these options (``config``: the PruneConfig), before any work."""
        self.check_targets(config.targets)

    def check_targets(self, targets: tuple[str, ...]) -> None:
        """Refuse targets this family does not support (before any work)."""
        refused = [t for t in targets if t not in self.supported_targets]
        if refused:
            raise ValueError(f"hf_snp cannot prune {', '.join(refused)} of {self.family} models; this family supports "
                             f"targets {list(self.supported_targets)}")


_REGISTRY: dict[str, ModelAdapter] = {}


class LlamaFamilyAdapter(ModelAdapter):
    """Llama-like decoders (adapters/llama.py lists them); the base of the MoE and vision-language adapters."""

    family = "Llama family"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "smollm3")
    layers_path = "model.layers"
    mlp = LLAMA_MLP
    attention_layout = LLAMA_ATTENTION
    mlp_width_field = "intermediate_size"
    stock_head_pruning = True  # num_attention_heads / num_key_value_heads with an explicit head_dim
    post_norm_types = ("gemma2", "gemma3_text", "olmo2")


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make ``adapter`` the one used for each of its ``model_types``, and register the variable-width type
    ``hf_snp_<model_type>`` derived from the stock classes."""
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
        _REGISTRY[f"hf_snp_{model_type}"] = adapter
        register_variable_width_types(model_type, adapter.auto_class, adapter.layout)
    return adapter


def supported_families() -> str:
    families: dict[str, list[str]] = {}
    for model_type, adapter in _REGISTRY.items():
        if not model_type.startswith("hf_snp_"):
            families.setdefault(adapter.family, []).append(model_type)
    return "; ".join(f"{family} ({', '.join(types)})" for family, types in families.items())


def get_adapter(config: PretrainedConfig) -> ModelAdapter:
    """The adapter for ``config.model_type``; a clear error for unsupported architectures."""
    return adapter_for_type(getattr(config, "model_type", None))


def adapter_for_type(model_type: str | None) -> ModelAdapter:
    """The adapter registered for a model_type (stock or hf_snp_*)."""
    if model_type not in _REGISTRY:
        raise ValueError(
            f"hf_snp cannot prune model_type {model_type!r}. Supported families: {supported_families()}. "
            "A family whose layers hf_snp can describe is added with a few lines of data: see 'Adding a family' "
            "in the README (hf_snp.register_adapter)."
        )
    return _REGISTRY[model_type]


def support_table() -> str:
    """The README's table of model types: targets and save formats, from the registry."""
    rows = ["| model type | family | MLP | heads | blocks | experts | uniform result saved as | otherwise |",
            "| --- | --- | :-: | :-: | :-: | :-: | --- | --- |"]
    for model_type, adapter in sorted(_REGISTRY.items()):
        if model_type.startswith("hf_snp_"):
            continue
        marks = ["yes" if t in adapter.supported_targets else "no" for t in ("mlp", "heads", "blocks", "experts")]
        heads_stock = adapter.stock_head_pruning or "heads" not in adapter.supported_targets
        uniform = "stock class" + ("" if heads_stock else " (fewer heads: the hf_snp type)")
        rows.append(f"| `{model_type}` | {adapter.family} | {' | '.join(marks)} | {uniform} | `hf_snp_{model_type}` |")
    return "\n".join(rows)
