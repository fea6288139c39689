"""The save format (docs/design.md §4): the stock class when its config can hold the pruned shapes, hf_snp's
variable-width type otherwise. Decided on shapes alone, so that setup can check it before any weights load."""

from __future__ import annotations

import copy
import logging

from transformers import PretrainedConfig, PreTrainedModel

from ..adapters.base import ModelAdapter
from ..models import variable_width_config_class, variable_width_model_class
from ..models.modeling_hf_snp import LayerShape
from ..units.records import LayerRecord

logger = logging.getLogger(__name__)


def base_model_type(model_type: str) -> str:
    return model_type.removeprefix("hf_snp_")


def layer_shapes(records: list[LayerRecord], previous: list[LayerShape]) -> list[LayerShape]:
    """Every layer's shape after pruning: its previous shape updated with the record's new shapes and biases."""
    return [old.updated(record.after) for record, old in zip(records, previous)]


def config_shapes(config: PretrainedConfig, num_layers: int) -> list[LayerShape]:
    """The per-layer shapes a config holds (``hf_snp_layers``; all stock for a stock config)."""
    specs = getattr(config, "hf_snp_layers", None) or [{} for _ in range(num_layers)]
    return [LayerShape.from_spec(spec) for spec in specs]


def stock_config_class(config: PretrainedConfig) -> type:
    """The stock config class of ``config``'s family (the base of its hf_snp config class)."""
    return variable_width_config_class(type(config)).__bases__[0]


def _stock_fields(config: PretrainedConfig, adapter: ModelAdapter, shapes: list[LayerShape]) -> dict | None:
    """The uniform shapes in stock config fields, or None where the stock layout cannot hold them
    (per-layer widths, an added bias, heads the family's stock config cannot express)."""
    if any(shape.mlp_output_bias or shape.attention_output_bias for shape in shapes):
        return None
    uniform = {}
    for field in LayerShape.WIDTHS:
        values = {getattr(shape, field) for index, shape in enumerate(shapes)
                  if adapter.layer_has(config, index, field)}
        if len(values) > 1:
            return None
        uniform[field] = values.pop() if values else None
    heads, kv_heads = uniform["num_attention_heads"], uniform["num_key_value_heads"]
    heads_changed = heads is not None and heads != adapter.shape_config(config).num_attention_heads
    if heads_changed and not (adapter.stock_head_pruning and heads and kv_heads):
        return None
    fields = {name: uniform[field] for field, name in adapter.shape_fields.items() if uniform[field] is not None}
    return {"width": uniform["intermediate_size"], "heads": (heads, kv_heads) if heads_changed else None,
            "fields": fields}


def _set_stock_fields(config: PretrainedConfig, adapter: ModelAdapter, stock: dict) -> None:
    if hasattr(config, "hf_snp_layers"):
        config.hf_snp_layers = None  # an hf_snp model that became uniform again
    if stock["width"] is not None:
        adapter.set_uniform_mlp_width(config, stock["width"])
    if stock["heads"] is not None:
        adapter.set_uniform_heads(config, *stock["heads"])
    for name, value in stock["fields"].items():
        setattr(config, name, value)


def _set_hf_snp_fields(config: PretrainedConfig, adapter: ModelAdapter, shapes: list[LayerShape]) -> None:
    shape_config = adapter.shape_config(config)
    if getattr(shape_config, "head_dim", "absent") is None:  # per-layer heads keep the original head_dim
        shape_config.head_dim = adapter.head_dim(config)
    config.__class__ = variable_width_config_class(type(config))  # a subclass of the stock config
    config.hf_snp_layers = [shape.to_spec() for shape in shapes]
    config.hf_snp_layout = adapter.layout(config)


def config_rejection(config_cls: type, config: PretrainedConfig) -> str | None:
    """Why ``config_cls`` refuses ``config`` as save_pretrained validates it and from_pretrained reads it
    back (None when it accepts it)."""
    try:
        if hasattr(config_cls, "validate"):  # transformers 5 validates the config in save_pretrained
            config_cls.validate(config)
        data = config.to_dict()
        data["model_type"] = config_cls.model_type
        if not config_cls.model_type.startswith("hf_snp_"):
            data.pop("hf_snp_layers", None)
            data.pop("auto_map", None)
        config_cls.from_dict(data)  # construction validates too (from_pretrained)
    except Exception as error:  # noqa: BLE001 - any refusal means "not this format"; the reason is passed on
        return f"{type(error).__name__}: {error}".replace("\n", " ")
    return None


def choose_save_format(adapter: ModelAdapter, config: PretrainedConfig, shapes: list[LayerShape]) -> str:
    """"stock" when the stock config holds ``shapes`` (uniform, no added bias) and accepts them, else "hf_snp"."""
    stock = _stock_fields(config, adapter, shapes)
    if stock is None:
        return "hf_snp"
    candidate = copy.deepcopy(config)
    _set_stock_fields(candidate, adapter, stock)
    reason = config_rejection(stock_config_class(config), candidate)
    if reason is None:
        return "stock"
    logger.info("the stock %s config refuses the pruned shapes (%s): saving as the hf_snp type",
                base_model_type(config.model_type), reason)
    return "hf_snp"


def _probe_shapes(adapter: ModelAdapter, config: PretrainedConfig) -> list[LayerShape]:
    """Per-layer shapes of the kind pruning can produce (narrower MLP, fewer heads, added biases)."""
    stock = adapter.shape_config(config)
    num_layers = stock.num_hidden_layers
    width = getattr(stock, adapter.mlp_width_field, None)
    heads = stock.num_attention_heads
    kv_heads = getattr(stock, "num_key_value_heads", None) or heads
    fewer = (kv_heads, kv_heads) if heads > kv_heads else (max(heads - 1, 1),) * 2
    change = LayerShape(intermediate_size=max(width - 1, 1) if width else None, mlp_output_bias=True,
                        num_attention_heads=fewer[0], num_key_value_heads=fewer[1], attention_output_bias=True)
    shapes = config_shapes(config, num_layers)
    return [shape.updated(change) if index % 2 == 0 else shape for index, shape in enumerate(shapes)]


def check_save_format(adapter: ModelAdapter, config: PretrainedConfig, shapes: list[LayerShape] | None = None) -> str:
    """Preflight, before any pruning: the format a result with ``shapes`` (one LayerShape per layer, as
    ``layer_shapes`` gives them; None = per-layer widths with added biases, which need the hf_snp type)
    would be saved in. Raises ValueError when that format's config would refuse it."""
    base = base_model_type(config.model_type)
    shapes = _probe_shapes(adapter, config) if shapes is None else shapes
    save_format = choose_save_format(adapter, config, shapes)
    candidate = copy.deepcopy(config)
    if save_format == "stock":
        _set_stock_fields(candidate, adapter, _stock_fields(config, adapter, shapes))
    else:
        _set_hf_snp_fields(candidate, adapter, shapes)
    reason = config_rejection(type(candidate), candidate)
    if reason is not None:
        raise ValueError(f"the pruned {base} model could not be saved: {type(candidate).__name__} refuses it: {reason}")
    return save_format


def finalize_architecture(model: PreTrainedModel, adapter: ModelAdapter, records: list[LayerRecord]) -> str:
    """Update the config to the pruned shapes; returns "stock" or "hf_snp" (the class it now is)."""
    config = model.config
    shapes = layer_shapes(records, config_shapes(config, len(records)))
    if choose_save_format(adapter, config, shapes) == "stock":
        _set_stock_fields(config, adapter, _stock_fields(config, adapter, shapes))
        return "hf_snp" if config.model_type.startswith("hf_snp_") else "stock"
    model_cls = variable_width_model_class(type(model))
    _set_hf_snp_fields(config, adapter, shapes)
    config.architectures = [model_cls.__name__]
    model.__class__ = model_cls  # a subclass that only differs in how __init__ sizes the layers
    return "hf_snp"
