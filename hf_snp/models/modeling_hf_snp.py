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
* ``expert_intermediate_size``: the width of every routed expert of that layer (mixtures of experts: the stacked
  ``gate_up_proj`` / ``down_proj`` hold one width per layer).
* ``num_experts``: that layer's routed experts (the router keeps one row per expert).
* ``shared_expert_intermediate_size``: the width of the layer's shared expert (Qwen2-MoE).

``config.hf_snp_layout``: ``layers`` (dotted path of the layer list, ``{prefix}`` the model's
``base_model_prefix``), ``mlp`` and ``attention`` (the fields of ``MlpLayout`` and
``AttentionLayout``) and ``head_dim``; for mixtures of experts also ``experts`` (the fields of ``ExpertsLayout``;
layers without experts use ``mlp``).
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
    layer is ``{}``); a bias flag means "the layer has a bias the stock module lacks". (hf_snp's
    pruning report records a layer as two shapes, before and after: ``hf_snp.units.records``.)
    """

    intermediate_size: int | None = None
    mlp_output_bias: bool = False
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    attention_output_bias: bool = False
    expert_intermediate_size: int | None = None
    num_experts: int | None = None
    shared_expert_intermediate_size: int | None = None

    WIDTHS: ClassVar[tuple[str, ...]] = ("intermediate_size", "num_attention_heads", "num_key_value_heads",
                                         "expert_intermediate_size", "num_experts", "shared_expert_intermediate_size")
    BIASES: ClassVar[tuple[str, ...]] = ("mlp_output_bias", "attention_output_bias")

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

    def updated(self, change: "LayerShape") -> "LayerShape":
        """This shape with ``change`` applied: its set widths replace ours, its biases add to ours."""
        widths = {key: getattr(self, key) if getattr(change, key) is None else getattr(change, key)
                  for key in self.WIDTHS}
        return LayerShape(**widths, **{key: getattr(self, key) or getattr(change, key) for key in self.BIASES})


def module_features(module: nn.Module, conv1d: bool = False) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` (weight [out, in]) or, with ``conv1d``, of a transformers
    ``Conv1D`` (weight [in, out])."""
    rows, cols = module.weight.shape
    return (rows, cols) if conv1d else (cols, rows)


def _groups(groups: list[int], size: int) -> torch.Tensor:
    """Indices of contiguous groups of ``size`` (group g = g*size .. g*size+size-1)."""
    groups_t = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    return (groups_t[:, None] * size + torch.arange(size)).flatten()


@dataclass(frozen=True)
class MlpLayout:
    """Where a family's MLP lives inside one decoder layer.

    A unit (neuron) is one output row of every producer and one input column of the consumer.
    ``producer_blocks`` > 1: each producer is a fused linear whose output rows hold the units that many times,
    block after block (Phi-3 ``gate_up_proj`` = [gate; up], 2 blocks): unit i of width W owns rows i, W + i, ...
    ``conv1d``: the producers and the consumer are transformers ``Conv1D`` modules (GPT-2), whose weight is
    [in, out]: a unit is a column of a producer's weight and a row of the consumer's.
    """

    parent: str  # submodule holding the linears ("" = the layer itself)
    producers: tuple[str, ...]  # linears whose output rows are the MLP units
    consumer: str  # linear whose input columns are the MLP units
    producer_blocks: int = 1  # times each producer's output rows hold the units ([gate; up] = 2)
    conv1d: bool = False  # Conv1D modules (weight [in, out]) instead of nn.Linear

    @classmethod
    def from_dict(cls, data: dict) -> "MlpLayout":
        """From ``dataclasses.asdict`` (``config.hf_snp_layout["mlp"]``; fields missing = their defaults)."""
        return cls(**{**data, "producers": tuple(data["producers"])})

    def producer_rows(self, keep: torch.Tensor, width: int) -> torch.Tensor:
        """The output rows of each producer that the kept units ``keep`` (of ``width``) own."""
        return torch.cat([keep + block * width for block in range(self.producer_blocks)])


QKV_LAYOUTS = ("separate", "blocks", "per_head")


class LayerConfig:
    """One layer's view of the model's config: its own values for a few fields (``overrides``), the shared
    config's for everything else (so a later change to the shared config, its attention implementation say,
    still reaches the layer). Given to the attention of a family that reads its head counts from the config
    in forward (``AttentionLayout.config_heads``)."""

    def __init__(self, config, **overrides):
        self.__dict__.update(_shared=config, _overrides=dict(overrides))

    def __getattr__(self, name: str):
        try:
            shared, overrides = self.__dict__["_shared"], self.__dict__["_overrides"]
        except KeyError:  # while being copied or unpickled
            raise AttributeError(name) from None
        return overrides[name] if name in overrides else getattr(shared, name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._shared, name, value)

    @property
    def shared(self):
        return self._shared


@dataclass(frozen=True)
class AttentionLayout:
    """Where a family's attention lives inside one decoder layer.

    ``o`` names the output projection, whose input columns are the heads' outputs (head after head, ``head_dim``
    each). ``qkv`` says how the query, key and value rows are laid out:

    * ``"separate"``: three linears named ``q``, ``k``, ``v`` (Llama, OPT, ViT);
    * ``"blocks"``: one fused linear (``q``, ``k`` and ``v`` all name it) whose rows are every query head, then
      every key head, then every value head (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``);
    * ``"per_head"``: one fused linear whose rows go head by head, each head's query, key and value rows
      together: [q_0; k_0; v_0; q_1; k_1; v_1; ...] (GPT-NeoX ``query_key_value``; multi-head attention only).

    ``conv1d``: the projections are transformers ``Conv1D`` modules (weight [in, out], GPT-2). ``config_heads``:
    the attention reads ``config.num_attention_heads`` in forward (Phi-3 splits its fused rows by it), so an
    attention whose head count changes gets its own view of the config (``LayerConfig``).

    ``q_norm`` / ``k_norm`` name a norm over the whole query (key) projection's output, one weight entry per row
    (OLMo 2: RMSNorm over ``num_heads * head_dim``): its entries go with their heads' rows. "" for none, and for a
    per-head norm over ``head_dim`` that every head shares (Qwen3, Gemma 3), which no cut changes. Separate q/k/v
    projections only.
    """

    parent: str
    q: str
    k: str
    v: str
    o: str
    qkv: str = "separate"  # one of QKV_LAYOUTS
    conv1d: bool = False  # Conv1D modules (weight [in, out]) instead of nn.Linear
    config_heads: bool = False  # the attention reads its head counts from its config in forward
    q_norm: str = ""  # a norm over the whole query projection (one weight entry per row), or ""
    k_norm: str = ""  # a norm over the whole key projection, or ""

    def __post_init__(self):
        if self.qkv not in QKV_LAYOUTS:
            raise ValueError(f"AttentionLayout.qkv must be one of {QKV_LAYOUTS}, not {self.qkv!r}")
        if (self.q_norm or self.k_norm) and self.qkv != "separate":
            raise ValueError("AttentionLayout.q_norm/k_norm need separate q/k/v projections (qkv='separate')")

    @property
    def projections(self) -> tuple[str, ...]:
        """The distinct modules holding the query, key and value rows."""
        return tuple(dict.fromkeys((self.q, self.k, self.v)))

    def projection_sizes(self, num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, int]:
        """Output rows of each projection module for the given head counts."""
        if self.qkv == "separate":
            return {self.q: num_heads * head_dim, self.k: num_kv_heads * head_dim, self.v: num_kv_heads * head_dim}
        return {self.q: (num_heads + 2 * num_kv_heads) * head_dim}

    def projection_rows(self, keep_q: list[int], keep_kv: list[int], num_heads: int, num_kv_heads: int,
                        head_dim: int) -> dict[str, torch.Tensor]:
        """The rows of each projection module that the kept query heads ``keep_q`` and key/value heads
        ``keep_kv`` own (of ``num_heads`` / ``num_kv_heads``), in order."""
        q, kv = _groups(keep_q, head_dim), _groups(keep_kv, head_dim)
        if self.qkv == "separate":
            return {self.q: q, self.k: kv, self.v: kv}
        if self.qkv == "blocks":
            k_start = num_heads * head_dim
            v_start = k_start + num_kv_heads * head_dim
            return {self.q: torch.cat([q, kv + k_start, kv + v_start])}
        if list(keep_q) != list(keep_kv):
            raise ValueError("a per-head fused q/k/v projection keeps the same query and key/value heads")
        return {self.q: _groups(keep_q, 3 * head_dim)}

    def norm_sizes(self, num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, int]:
        """Weight entries of each whole-projection q/k norm for the given head counts (none: empty)."""
        sizes = {self.q_norm: num_heads * head_dim, self.k_norm: num_kv_heads * head_dim}
        return {name: size for name, size in sizes.items() if name}

    def norm_rows(self, keep_q: list[int], keep_kv: list[int], head_dim: int) -> dict[str, torch.Tensor]:
        """The weight entries of each whole-projection q/k norm that the kept heads own, in order."""
        rows = {self.q_norm: _groups(keep_q, head_dim), self.k_norm: _groups(keep_kv, head_dim)}
        return {name: kept for name, kept in rows.items() if name}

    def num_kv_heads(self, attention: nn.Module, num_heads: int, head_dim: int) -> int:
        """Key/value heads of ``attention`` with ``num_heads`` query heads, from its projections' shapes
        (0 for an ``EmptyAttention``)."""
        module = getattr(attention, self.k, None)
        if module is None:
            return 0
        rows = module_features(module, self.conv1d)[1] // head_dim
        return {"separate": rows, "blocks": (rows - num_heads) // 2, "per_head": rows // 3}[self.qkv]

    def set_head_counts(self, attention: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Update whichever head-count attributes the family's attention module reads in forward."""
        if hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = num_heads // max(num_kv_heads, 1)
        if hasattr(attention, "num_heads"):
            attention.num_heads = num_heads
        if hasattr(attention, "num_attention_heads"):
            attention.num_attention_heads = num_heads
        if hasattr(attention, "num_key_value_heads"):
            attention.num_key_value_heads = num_kv_heads
        if hasattr(attention, "split_size") and hasattr(attention, "head_dim"):  # GPT-2 splits c_attn's output
            attention.split_size = num_heads * attention.head_dim
        if self.config_heads:
            shared = attention.config.shared if isinstance(attention.config, LayerConfig) else attention.config
            attention.config = LayerConfig(shared, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)


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

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, layer_past=None, **kwargs):
        batch, length = hidden_states.shape[:2]
        cache = past_key_values if past_key_values is not None else layer_past  # GPT-NeoX: layer_past
        cache = getattr(cache, "self_attention_cache", cache)  # an EncoderDecoderCache (GPT-2)
        if cache is not None:
            empty = hidden_states.new_zeros(batch, 0, length, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        output = getattr(self, self.output_name)
        if hasattr(output, "nf"):  # a transformers Conv1D cannot run on 0 input features (its view(-1, 0)): its bias
            return output.bias.expand(*hidden_states.shape[:-1], output.nf), None
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
    o_in, o_out = module_features(old_o, layout.conv1d)
    bias = output_bias or old_o.bias is not None
    if num_heads == 0:
        make_empty_attention(layer, layout, _new_module(old_o, 0, o_out, bias, layout.conv1d), head_dim)
        return
    if num_heads is not None:
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, rows in layout.projection_sizes(num_heads, num_kv_heads, head_dim).items():
            old = getattr(attention, name)
            in_features = module_features(old, layout.conv1d)[0]
            setattr(attention, name, _new_module(old, in_features, rows, old.bias is not None, layout.conv1d))
        for name, size in layout.norm_sizes(num_heads, num_kv_heads, head_dim).items():
            norm = getattr(attention, name)
            norm.weight = nn.Parameter(norm.weight.new_empty(size), requires_grad=norm.weight.requires_grad)
        layout.set_head_counts(attention, num_heads, num_kv_heads)
    in_features = o_in if num_heads is None else num_heads * head_dim
    if in_features != o_in or bias != (old_o.bias is not None):
        setattr(attention, layout.o, _new_module(old_o, in_features, o_out, bias, layout.conv1d))


def _new_module(old: nn.Module, in_features: int, out_features: int, bias: bool, conv1d: bool = False) -> nn.Module:
    """An uninitialised ``nn.Linear`` (or transformers ``Conv1D``, which always has a bias) like ``old``."""
    device, dtype = old.weight.device, old.weight.dtype
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        with torch.device(device):
            return Conv1D(out_features, in_features).to(dtype)
    return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)


def resize_mlp(layer: nn.Module, layout: MlpLayout, width: int | None, output_bias: bool) -> None:
    """Replace one layer's MLP linears by empty ones of ``width`` units (weights load later)."""
    parent = layer.get_submodule(layout.parent) if layout.parent else layer
    if width is not None:
        for name in layout.producers:
            old = getattr(parent, name)
            rows = width * layout.producer_blocks
            in_features = module_features(old, layout.conv1d)[0]
            setattr(parent, name, _new_module(old, in_features, rows, old.bias is not None, layout.conv1d))
        if hasattr(parent, "intermediate_size"):
            parent.intermediate_size = width
    consumer = getattr(parent, layout.consumer)
    units, out_features = module_features(consumer, layout.conv1d)
    in_features = units if width is None else width
    bias = output_bias or consumer.bias is not None
    if in_features != units or bias != (consumer.bias is not None):
        setattr(parent, layout.consumer, _new_module(consumer, in_features, out_features, bias, layout.conv1d))


@dataclass(frozen=True)
class ExpertsLayout:
    """Where a family's mixture of experts lives inside one decoder layer (a layer without one has the dense
    ``MlpLayout``, e.g. Qwen2-MoE's ``mlp_only_layers``).

    ``experts`` (under ``parent``) is one module holding every routed expert stacked (transformers 5.x):
    ``gate_up_proj`` [E, 2I, H] (every gate row, then every up row), ``down_proj`` [E, H, I], with the attributes
    ``num_experts`` and ``intermediate_dim``; ``router`` has ``weight`` [E, H] and ``num_experts``. ``shared``: a gated
    MLP every token goes through beside the routed experts (Qwen2-MoE ``shared_expert``), or None.
    """

    parent: str = "mlp"  # the sparse MoE block
    experts: str = "experts"
    router: str = "gate"
    shared: MlpLayout | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "ExpertsLayout":
        """From ``dataclasses.asdict`` (``config.hf_snp_layout["experts"]``)."""
        shared = data.get("shared")
        return cls(**{**data, "shared": None if shared is None else MlpLayout.from_dict(shared)})

    def block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's sparse MoE block, or None for a layer with a dense MLP."""
        try:
            block = layer.get_submodule(self.parent)
        except AttributeError:
            return None
        return block if isinstance(getattr(block, self.experts, None), nn.Module) else None


def resize_experts(layer: nn.Module, layout: ExpertsLayout, shape: "LayerShape") -> None:
    """Replace one layer's stacked expert weights (and router rows, shared expert) by empty ones of the shape's
    expert count and widths (weights load later)."""
    block = layout.block(layer)
    experts, router = getattr(block, layout.experts), getattr(block, layout.router)
    count, hidden, width = experts.down_proj.shape
    new_count = count if shape.num_experts is None else shape.num_experts
    new_width = width if shape.expert_intermediate_size is None else shape.expert_intermediate_size
    if (new_count, new_width) != (count, width):
        like = experts.down_proj
        experts.gate_up_proj = nn.Parameter(like.new_empty(new_count, 2 * new_width, hidden))
        experts.down_proj = nn.Parameter(like.new_empty(new_count, hidden, new_width))
        experts.num_experts, experts.intermediate_dim = new_count, new_width
    if new_count != router.weight.shape[0]:
        router.weight = nn.Parameter(router.weight.new_empty(new_count, router.weight.shape[1]))
        if getattr(router, "bias", None) is not None:
            router.bias = nn.Parameter(router.bias.new_empty(new_count))
        router.num_experts = new_count
    if layout.shared is not None and shape.shared_expert_intermediate_size is not None:
        resize_mlp(layer, layout.shared, shape.shared_expert_intermediate_size, False)


def apply_layer_specs(layers: nn.ModuleList, specs: list[dict] | None, mlp: MlpLayout, attention: AttentionLayout,
                      head_dim: int, experts: ExpertsLayout | None = None) -> None:
    """Resize every decoder layer to its entry of ``config.hf_snp_layers``."""
    if not specs:
        return
    if len(specs) != len(layers):
        raise ValueError(f"hf_snp_layers has {len(specs)} entries for {len(layers)} decoder layers")
    for layer, spec in zip(layers, specs):
        shape = LayerShape.from_spec(spec)
        if experts is not None and experts.block(layer) is not None:
            resize_experts(layer, experts, shape)
        else:
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
    experts = ExpertsLayout.from_dict(layout["experts"]) if layout.get("experts") else None
    apply_layer_specs(layers, specs, MlpLayout.from_dict(layout["mlp"]), AttentionLayout(**layout["attention"]),
                      int(layout["head_dim"]), experts)


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
        _new_class(name, stock, {"model_type": f"hf_snp_{stock.model_type}", "hf_snp_layers": None,
                                 "hf_snp_layout": None,
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
