"""hf_snp's variable-width model type, one for every family (docs/design.md §9.2).

``HfSnp<StockClass>`` subclasses a stock transformers class (``HfSnpGemma3ForCausalLM`` of
``Gemma3ForCausalLM``, ``HfSnpGemma3TextConfig`` of ``Gemma3TextConfig``) and only resizes the
per-layer modules after the stock ``__init__``: the weights keep the stock key names. The classes
are made on demand from the stock ones (this module's ``__getattr__``), so no family has code of
its own. Where a family's modules live is data in the config (``hf_snp_layout``), and each
layer's shapes are ``hf_snp_layers``.

This file travels with every checkpoint saved in the hf_snp format (``auto_map``), so it imports
nothing but torch and transformers: ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` (``AutoModelForImageClassification`` for ViT/DeiT) works where hf_snp
is not installed.

``config.hf_snp_layers`` holds one dict per transformer layer (``LayerShape.to_spec``). Known
keys (missing = stock):

* ``intermediate_size``: MLP width of that layer.
* ``mlp_output_bias``: the MLP output projection has a bias (added by mean-shift folding).
* ``num_attention_heads`` / ``num_key_value_heads``: that layer's head counts (head_dim is
  unchanged). A layer with 0 heads has an ``EmptyAttention`` that adds only its bias.
* ``attention_output_bias``: the attention output projection has a bias.

``config.hf_snp_layout``: ``layers`` (dotted path of the layer list, ``{prefix}`` the model's
``base_model_prefix``), ``mlp`` and ``attention`` (the fields of ``MlpLayout`` and
``AttentionLayout``) and ``head_dim``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import transformers
from torch import nn


@dataclass(frozen=True)
class LayerShape:
    """One transformer layer's shapes where they differ from the stock config (None/False = stock).

    The single description of a pruned layer's shape: ``to_spec``/``from_spec`` give its entry
    of ``config.hf_snp_layers`` (only the set fields are written, so the entry of an unpruned
    layer is ``{}``), ``to_record``/``from_record`` its part of the pruning report's per-layer
    record (``mlp_width``, ``num_heads``, ``num_kv_heads``, ``*_bias_added`` and, given the shape
    before, the ``*_before`` widths). In a record, a bias flag means "added by this run"; in a
    spec it means "the layer has a bias the stock module lacks".
    """

    intermediate_size: int | None = None
    mlp_output_bias: bool = False
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    attention_output_bias: bool = False

    WIDTHS: ClassVar[tuple[str, ...]] = ("intermediate_size", "num_attention_heads", "num_key_value_heads")
    BIASES: ClassVar[tuple[str, ...]] = ("mlp_output_bias", "attention_output_bias")
    # field -> key of the report's per-layer record (the widths also have a "<key>_before")
    RECORD_KEYS: ClassVar[dict[str, str]] = {
        "intermediate_size": "mlp_width",
        "mlp_output_bias": "mlp_output_bias_added",
        "num_attention_heads": "num_heads",
        "num_key_value_heads": "num_kv_heads",
        "attention_output_bias": "attention_output_bias_added",
    }
    # which target owns a field: a record carries a target's keys only when that target was pruned
    MLP_FIELDS: ClassVar[tuple[str, ...]] = ("intermediate_size", "mlp_output_bias")
    HEAD_FIELDS: ClassVar[tuple[str, ...]] = ("num_attention_heads", "num_key_value_heads", "attention_output_bias")

    @classmethod
    def from_spec(cls, spec: dict | None) -> "LayerShape":
        """Read one ``hf_snp_layers`` entry (missing keys = stock)."""
        spec = dict(spec or {})
        unknown = set(spec) - set(cls.WIDTHS + cls.BIASES)
        if unknown:
            raise ValueError(f"unknown hf_snp_layers keys {sorted(unknown)}: this checkpoint needs a newer hf_snp")
        widths = {key: None if spec.get(key) is None else int(spec[key]) for key in cls.WIDTHS}
        return cls(**widths, **{key: bool(spec.get(key, False)) for key in cls.BIASES})

    def to_spec(self) -> dict:
        """The ``hf_snp_layers`` entry: the set widths and the biases that are present."""
        values = ((field.name, getattr(self, field.name)) for field in dataclasses.fields(self))
        return {key: value for key, value in values if value is not None and value is not False}

    @classmethod
    def from_record(cls, record: dict, before: bool = False) -> "LayerShape":
        """The shape a report record gives after pruning (``before``: the widths it had before; no biases)."""
        suffix = "_before" if before else ""
        widths = {key: record.get(cls.RECORD_KEYS[key] + suffix) for key in cls.WIDTHS}
        biases = {} if before else {key: bool(record.get(cls.RECORD_KEYS[key], False)) for key in cls.BIASES}
        return cls(**widths, **biases)

    def to_record(self, before: "LayerShape | None" = None, fields: tuple[str, ...] | None = None) -> dict:
        """The report's record keys for ``fields`` (default: the targets whose width is set);
        each width is preceded by its ``_before`` value when ``before`` is given."""
        if fields is None:
            fields = (self.MLP_FIELDS if self.intermediate_size is not None else ()) + (
                self.HEAD_FIELDS if self.num_attention_heads is not None else ())
        record = {}
        for key in fields:
            name = self.RECORD_KEYS[key]
            if before is not None and key in self.WIDTHS:
                record[name + "_before"] = getattr(before, key)
            record[name] = getattr(self, key)
        return record

    def updated(self, change: "LayerShape") -> "LayerShape":
        """This shape with ``change`` applied: its set widths replace ours, its biases add to ours."""
        widths = {key: getattr(self, key) if getattr(change, key) is None else getattr(change, key)
                  for key in self.WIDTHS}
        return LayerShape(**widths, **{key: getattr(self, key) or getattr(change, key) for key in self.BIASES})


@dataclass(frozen=True)
class MlpLayout:
    """Where a family's MLP lives inside one decoder layer."""

    parent: str  # submodule holding the linears ("" = the layer itself)
    producers: tuple[str, ...]  # linears whose output rows are the MLP units
    consumer: str  # linear whose input columns are the MLP units


@dataclass(frozen=True)
class AttentionLayout:
    """Where a family's attention lives inside one decoder layer."""

    parent: str
    q: str
    k: str
    v: str
    o: str

    @staticmethod
    def set_head_counts(attention: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Update whichever head-count attributes the family's attention module reads in forward."""
        if hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = num_heads // max(num_kv_heads, 1)
        if hasattr(attention, "num_heads"):
            attention.num_heads = num_heads
        if hasattr(attention, "num_attention_heads"):
            attention.num_attention_heads = num_heads
        if hasattr(attention, "num_key_value_heads"):
            attention.num_key_value_heads = num_kv_heads


LLAMA_MLP = MlpLayout("mlp", ("gate_proj", "up_proj"), "down_proj")
OPT_MLP = MlpLayout("", ("fc1",), "fc2")
VIT_MLP = MlpLayout("mlp", ("fc1",), "fc2")
LLAMA_ATTENTION = AttentionLayout("self_attn", "q_proj", "k_proj", "v_proj", "o_proj")
OPT_ATTENTION = AttentionLayout("self_attn", "q_proj", "k_proj", "v_proj", "out_proj")
VIT_ATTENTION = AttentionLayout("attention", "q_proj", "k_proj", "v_proj", "o_proj")


class EmptyAttention(nn.Module):
    """An attention block whose every head was pruned: it adds its output bias (or nothing).

    It keeps the output projection (0 input features) under the stock name so the bias keeps
    its stock key, and it still appends empty keys/values to a KV cache so that the cache's
    sequence length stays right during generation.
    """

    def __init__(self, output: nn.Linear, output_name: str, layer_idx: int, head_dim: int):
        super().__init__()
        self.output_name = output_name
        setattr(self, output_name, output)
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, **kwargs):
        batch, length = hidden_states.shape[:2]
        if past_key_values is not None:
            empty = hidden_states.new_zeros(batch, 0, length, self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        output = getattr(self, self.output_name)
        return output(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


def make_empty_attention(layer: nn.Module, layout: AttentionLayout, output: nn.Linear, head_dim: int) -> EmptyAttention:
    old = layer.get_submodule(layout.parent)
    empty = EmptyAttention(output, layout.o, getattr(old, "layer_idx", 0), head_dim)
    setattr(layer, layout.parent, empty)
    return empty


def resize_attention(layer: nn.Module, layout: AttentionLayout, num_heads: int | None, num_kv_heads: int | None,
                     head_dim: int, output_bias: bool) -> None:
    """Replace one layer's attention projections by empty ones with the given head counts."""
    attention = layer.get_submodule(layout.parent)
    old_o = getattr(attention, layout.o)
    bias = output_bias or old_o.bias is not None
    if num_heads == 0:
        make_empty_attention(layer, layout, _new_linear(old_o, 0, old_o.out_features, bias), head_dim)
        return
    if num_heads is not None:
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, heads in ((layout.q, num_heads), (layout.k, num_kv_heads), (layout.v, num_kv_heads)):
            old = getattr(attention, name)
            setattr(attention, name, _new_linear(old, old.in_features, heads * head_dim, old.bias is not None))
        layout.set_head_counts(attention, num_heads, num_kv_heads)
    in_features = old_o.in_features if num_heads is None else num_heads * head_dim
    if in_features != old_o.in_features or bias != (old_o.bias is not None):
        setattr(attention, layout.o, _new_linear(old_o, in_features, old_o.out_features, bias))


def _new_linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_mlp(layer: nn.Module, layout: MlpLayout, width: int | None, output_bias: bool) -> None:
    """Replace one layer's MLP linears by empty ones of ``width`` units (weights load later)."""
    parent = layer.get_submodule(layout.parent) if layout.parent else layer
    if width is not None:
        for name in layout.producers:
            old = getattr(parent, name)
            setattr(parent, name, _new_linear(old, old.in_features, width, old.bias is not None))
        if hasattr(parent, "intermediate_size"):
            parent.intermediate_size = width
    consumer = getattr(parent, layout.consumer)
    in_features = consumer.in_features if width is None else width
    bias = output_bias or consumer.bias is not None
    if in_features != consumer.in_features or bias != (consumer.bias is not None):
        setattr(parent, layout.consumer, _new_linear(consumer, in_features, consumer.out_features, bias))


def apply_layer_specs(layers: nn.ModuleList, specs: list[dict] | None, mlp: MlpLayout, attention: AttentionLayout,
                      head_dim: int) -> None:
    """Resize every decoder layer to its entry of ``config.hf_snp_layers``."""
    if not specs:
        return
    if len(specs) != len(layers):
        raise ValueError(f"hf_snp_layers has {len(specs)} entries for {len(layers)} decoder layers")
    for layer, spec in zip(layers, specs):
        shape = LayerShape.from_spec(spec)
        resize_mlp(layer, mlp, shape.intermediate_size, shape.mlp_output_bias)
        resize_attention(layer, attention, shape.num_attention_heads, shape.num_key_value_heads, head_dim,
                         shape.attention_output_bias)


def apply_layout(model: nn.Module, specs: list[dict] | None, layout: dict | None) -> None:
    """Resize ``model``'s layers to ``specs`` (``hf_snp_layers``), its modules found by ``layout``."""
    if not specs:
        return
    if not layout:
        raise ValueError("this checkpoint has hf_snp_layers but no hf_snp_layout; load it with hf_snp installed "
                         "(import hf_snp) so that the family's layout is known")
    layers = model.get_submodule(layout["layers"].format(prefix=model.base_model_prefix))
    mlp = MlpLayout(**{**layout["mlp"], "producers": tuple(layout["mlp"]["producers"])})
    apply_layer_specs(layers, specs, mlp, AttentionLayout(**layout["attention"]), int(layout["head_dim"]))


def head_dim_of(config) -> int:
    """The explicit ``head_dim`` of a config, else hidden_size // num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


PREFIX = "HfSnp"
_CLASSES: dict[str, type] = {}


def _new_class(name: str, stock: type, namespace: dict) -> type:
    cls = type(name, (stock,), {"__module__": __name__, "__qualname__": name, "hf_snp_variable_width": True,
                                **namespace})
    _CLASSES[name] = cls
    globals()[name] = cls
    return cls


def variable_width_config_class(stock: type) -> type:
    """``HfSnp<Stock>``: the stock config with ``model_type`` "hf_snp_<stock type>", ``hf_snp_layers`` and
    ``hf_snp_layout`` (every stock field stays valid)."""
    if getattr(stock, "hf_snp_variable_width", False):
        return stock
    name = PREFIX + stock.__name__
    if name not in _CLASSES:
        _new_class(name, stock, {"model_type": f"hf_snp_{stock.model_type}", "hf_snp_layers": None, "hf_snp_layout": None,
                                 "__annotations__": {"hf_snp_layers": "list | None", "hf_snp_layout": "dict | None"}})
    return _CLASSES[name]


def variable_width_model_class(stock: type) -> type:
    """``HfSnp<Stock>``: the stock model whose ``__init__`` resizes each layer to ``config.hf_snp_layers``."""
    if getattr(stock, "hf_snp_variable_width", False):
        return stock
    name = PREFIX + stock.__name__
    if name not in _CLASSES:

        def __init__(self, config, *args, **kwargs):
            stock.__init__(self, config, *args, **kwargs)
            layout = getattr(config, "hf_snp_layout", None) or type(self).default_layout(config)
            apply_layout(self, getattr(config, "hf_snp_layers", None), layout)

        _new_class(name, stock, {"config_class": variable_width_config_class(stock.config_class), "__init__": __init__,
                                 "default_layout": staticmethod(lambda config: None)})
    return _CLASSES[name]


def __getattr__(name: str) -> type:
    """``HfSnp<StockClass>`` for any transformers config or model class (how ``auto_map`` finds them)."""
    stock = getattr(transformers, name[len(PREFIX):], None) if name.startswith(PREFIX) else None
    if isinstance(stock, type) and issubclass(stock, transformers.PretrainedConfig):
        return variable_width_config_class(stock)
    if isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel):
        return variable_width_model_class(stock)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
