"""Per-architecture adapters: where the blocks and prunable sites of a family live.

The engine and the methods only talk to an adapter; they never test model classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..models.modeling_hf_snp import MlpLayout


@dataclass
class Site:
    """One linear map ``y = W h + b`` whose input units ``h`` can be removed.

    ``producers`` are the linears whose output rows create the units (their rows are
    deleted with the unit); ``consumer`` is the linear that reads them (its columns are
    deleted and receive the reconstruction). ``group_size`` is 1 for neurons and
    ``head_dim`` for attention heads.
    """

    kind: str  # "mlp" (later: "heads")
    layer: int
    parent: nn.Module
    producers: tuple[str, ...]
    consumer: str
    group_size: int = 1

    @property
    def consumer_linear(self) -> nn.Linear:
        return getattr(self.parent, self.consumer)

    @property
    def producer_linears(self) -> list[nn.Linear]:
        return [getattr(self.parent, name) for name in self.producers]

    @property
    def num_units(self) -> int:
        return self.consumer_linear.in_features

    def params_per_unit(self) -> int:
        """Parameters removed with one unit: a producer row (+bias) per producer, a consumer column."""
        rows = sum(lin.in_features + (lin.bias is not None) for lin in self.producer_linears)
        return rows + self.consumer_linear.out_features

    def num_params(self) -> int:
        """All parameters of the site's linears (weights and biases)."""
        return sum(sum(p.numel() for p in lin.parameters()) for lin in [*self.producer_linears, self.consumer_linear])


class ModelAdapter:
    """Describes one model family. Subclasses fill in the class attributes and hooks."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    layers_path: str = ""  # dotted path of the decoder-layer ModuleList
    mlp: MlpLayout
    mlp_width_field: str = ""  # config field holding the (uniform) MLP width
    attention_name: str = "self_attn"

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def layer_prefix(self, model: PreTrainedModel, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def mlp_site(self, layer: nn.Module, index: int) -> Site:
        parent = layer.get_submodule(self.mlp.parent) if self.mlp.parent else layer
        return Site("mlp", index, parent, self.mlp.producers, self.mlp.consumer)

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention submodule (its output is replayed from cache when it is not pruned)."""
        return layer.get_submodule(self.attention_name)

    def mlp_width(self, config: PretrainedConfig) -> int:
        return getattr(config, self.mlp_width_field)

    def set_uniform_mlp_width(self, config: PretrainedConfig, width: int) -> None:
        setattr(config, self.mlp_width_field, width)


_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make ``adapter`` the one used for each of its ``model_types`` (and their hf_snp types)."""
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
        _REGISTRY[f"hf_snp_{model_type}"] = adapter
    return adapter


def supported_families() -> str:
    families: dict[str, list[str]] = {}
    for model_type, adapter in _REGISTRY.items():
        if not model_type.startswith("hf_snp_"):
            families.setdefault(adapter.family, []).append(model_type)
    return "; ".join(f"{family} ({', '.join(types)})" for family, types in families.items())


def get_adapter(config: PretrainedConfig) -> ModelAdapter:
    """The adapter for ``config.model_type``; a clear error for unsupported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"hf_snp cannot prune model_type {model_type!r}. Supported families: {supported_families()}."
        )
    return _REGISTRY[model_type]
