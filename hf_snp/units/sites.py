"""Prunable sites: one linear map y = W h + b whose input units h can be removed.

A site knows its geometry (units, how they group), which groups may be removed together
(its RemovalPlan), what one removal step costs in parameters, and how to cut itself.
``producers`` create the units (their rows go with a unit), the ``consumer`` reads them
(its columns go, and receive the reconstruction). Where the rows of a unit sit (fused projections,
transformers ``Conv1D`` modules with transposed weights) is the family's layout (``MlpLayout``,
``AttentionLayout``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..models.modeling_hf_snp import AttentionLayout, LayerShape, MlpLayout, make_empty_attention, module_features
from .records import HEAD_FIELDS, MLP_FIELDS, LayerRecord
from .removal import Decision, RemovalPlan, select_by_score
from .site_inputs import Decides, SiteInputs
from .stats import PostNormMetric, SiteStatistics
from .surgery import fold_into_consumer, keep_rows

if TYPE_CHECKING:
    from ..config import PruneConfig


def count_parameters(*modules: nn.Module) -> int:
    """Distinct parameters of the modules (tied weights counted once; offloaded ones included)."""
    return sum(p.numel() for module in modules for p in module.parameters())


def _distinct(*modules: nn.Module | None) -> list[nn.Module]:
    """The modules, each once (q, k and v may name one fused projection), without the absent ones."""
    return list({id(module): module for module in modules if module is not None}.values())


def _row_params(module: nn.Module | None, rows: int, conv1d: bool = False) -> int:
    """Parameters of ``rows`` output units of a Linear (or Conv1D): their weights and bias entries (0 for a module
    that is gone: an ``EmptyAttention``'s projections)."""
    if module is None:
        return 0
    return rows * (module_features(module, conv1d)[0] + (module.bias is not None))


class ConsumerSite(ABC):
    """A site whose units enter one consumer module (``consumer_linear``): the defaults of both sides of
    ``Site`` (``hf_snp.units.protocols``). A site kind gives the abstract members: its consumer, removal plan,
    costs, cut and shapes; ``kind``, ``fields`` (the LayerShape fields it owns) and its layout."""

    kind: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()  # the LayerShape fields this site owns
    can_add_bias: ClassVar[bool] = True  # may a bias be added to the consumer (a mean shift, add_bias=True)?
    width_multiple: ClassVar[int] = 1  # the widths the site may take are multiples of this (besides round_to)
    tied: ClassVar[bool] = False  # must every site of this kind in the layer take the same steps (stacked experts)?
    # is a step one unit: width_after(s) = num_units - s and params_removed(s) = s * params_per_step()?
    single_units: ClassVar[bool] = False
    layout: MlpLayout | AttentionLayout

    def __init__(self, layer: nn.Module, index: int):
        self.layer, self.index = layer, index
        self.bias_added = False
        self.ridge: float | None = None  # the λ its reconstruction used, when chosen on held-out tokens (§3.8)
        self.choice: str | None = None  # the candidate decision chosen on held-out tokens (ordering='heldout', §3.12)
        # the norm applied to the consumer's output (Gemma 2/3, OLMo 2 post-norms): the statistics weigh each token
        # by it, and the method its output dimensions (docs/design.md §3.11); None: the output is used as it is
        self.post_norm: nn.Module | None = None

    @property
    @abstractmethod
    def consumer_linear(self) -> nn.Module:
        """The consumer module (``nn.Linear``, or ``Conv1D`` where the layout says so): its input is the units."""

    @abstractmethod
    def plan(self, steps: int) -> RemovalPlan: ...

    @abstractmethod
    def max_steps(self) -> int: ...

    @abstractmethod
    def width_after(self, steps: int) -> int:
        """Width (MLP neurons, query heads, experts) after ``steps`` removal steps."""

    @abstractmethod
    def params_per_step(self) -> int: ...

    @abstractmethod
    def num_params(self) -> int: ...

    @abstractmethod
    def apply(self, decision: Decision) -> None: ...

    @abstractmethod
    def shape(self) -> LayerShape:
        """The site's part of its layer's shape now (biases: added by this run)."""

    @abstractmethod
    def shape_before(self) -> LayerShape:
        """The site's widths before pruning."""

    @abstractmethod
    def shape_after(self, steps: int, bias_added: bool = False) -> LayerShape:
        """The site's part of its layer's shape after ``steps`` removal steps (for checks before pruning)."""

    @abstractmethod
    def reshape_to(self, shape: LayerShape) -> None:
        """Cut the site to ``shape`` (its fields for this site's target; weights to be loaded afterwards)."""

    # --- the method side's defaults ---------------------------------------------------------------------

    @property
    def slot(self) -> str:
        """What the site is within its layer (its kind; one expert of a mixture: "expert 3")."""
        return self.kind

    @property
    def consumer_weight(self) -> torch.Tensor:
        """The consumer's weight as [outputs, units] (a Conv1D's weight transposed), detached."""
        weight = self.consumer_linear.weight.detach()
        return weight.T if self.layout.conv1d else weight

    @property
    def num_units(self) -> int:
        return module_features(self.consumer_linear, self.layout.conv1d)[0]

    @property
    def consumer_outputs(self) -> int:
        return module_features(self.consumer_linear, self.layout.conv1d)[1]

    @property
    def consumer_has_bias(self) -> bool:
        return self.consumer_linear.bias is not None

    def curve_steps(self) -> int:
        """Steps of the full order (the cost curve's normalisation includes every group)."""
        return self.max_steps()

    def params_removed(self, steps: int) -> int:
        """Parameters that ``steps`` removal steps take out of the site."""
        return steps * self.params_per_step()

    def step_table(self) -> tuple[list[int], list[int]]:
        """``width_after(s)`` and ``params_removed(s)`` for every step count s from 0 to ``max_steps()`` (with
        ``single_units``: from the modules' shapes read once)."""
        steps = range(self.max_steps() + 1)
        if self.single_units:
            width, per_step = self.num_units, self.params_per_step()
            return [width - s for s in steps], [s * per_step for s in steps]
        return [self.width_after(s) for s in steps], [self.params_removed(s) for s in steps]

    # --- the engine side's defaults (docs/design.md §8.2): a pre-hook on the consumer sees the units, and once
    # it has run for every site the statistics pass may stop ------------------------------------------------

    @property
    def name(self) -> str:
        return f"layer {self.index} {self.slot}"

    @property
    def ridge_name(self) -> str:
        """Whose held-out ridge the layer record shows (``<ridge_name>_ridge``, docs/design.md §3.8)."""
        return self.kind

    @property
    def stop_module(self) -> nn.Module:
        """The module whose forward pre-hook finds this site's statistics complete (the statistics pass stops
        once every site's has run): the consumer, or the post-norm after it (its output weighs the tokens)."""
        return self.consumer_linear if self.post_norm is None else self.post_norm

    def new_statistics(self, device: torch.device, folds: int = 1) -> SiteStatistics:
        metric = None if self.post_norm is None else PostNormMetric.of(self.post_norm, self.consumer_outputs, device)
        return SiteStatistics(f"{self.name} ({type(self.consumer_linear).__name__} input)", self.num_units, device,
                              folds, post_norm=metric)

    def observe(self, stats: SiteStatistics) -> list:
        """Hooks that feed ``stats`` with the units entering the consumer (objects with ``remove()``); with a
        post-norm, a hook after the consumer that also sees its output (docs/design.md §3.11)."""
        if stats.post_norm is None:
            return [self.consumer_linear.register_forward_pre_hook(stats.hook)]
        return [self.consumer_linear.register_forward_hook(
            lambda module, args, output: stats.update_after_norm(args[0], output.detach()))]

    def decide(self, method: Decides, inputs: SiteInputs, config: "PruneConfig") -> Decision:
        """The method's decision for this site."""
        return method.decide(inputs, config)

    def describe(self) -> LayerRecord:
        """The site's part of its layer's record: its fields' widths before and shape now, its held-out ridge and
        decision."""
        ridges = {} if self.ridge is None else {self.ridge_name: self.ridge}
        choices = {} if self.choice is None else {self.ridge_name: self.choice}
        return LayerRecord(self.index, self.shape_before(), self.shape(), self.fields, ridges, choices=choices)

    def reshape_like(self, record: LayerRecord) -> None:
        """Cut the site to the shapes a record describes (weights to be loaded afterwards)."""
        self.reshape_to(record.after)

    def _placeholder_decision(self, steps: int, bias_added: bool) -> Decision:
        plan = self.plan(steps)
        removed = select_by_score(-torch.arange(plan.num_groups, dtype=torch.float64), plan)
        decision = plan.decision(removed, self.consumer_linear.weight.device)
        if bias_added:
            decision.shift = torch.zeros(len(decision.drop), dtype=torch.float64)
        return decision


class MlpSite(ConsumerSite):
    """MLP neurons: one unit per group, any unit may go (at least one stays)."""

    kind = "mlp"
    fields = MLP_FIELDS
    single_units = True

    def __init__(self, layer: nn.Module, index: int, layout: MlpLayout):
        super().__init__(layer, index)
        self.layout = layout
        self.parent = layer.get_submodule(layout.parent) if layout.parent else layer
        self.width_before = self.num_units

    @property
    def consumer_linear(self) -> nn.Linear:
        return getattr(self.parent, self.layout.consumer)

    @property
    def producer_linears(self) -> list[nn.Linear]:
        return [getattr(self.parent, name) for name in self.layout.producers]

    def plan(self, steps: int) -> RemovalPlan:
        return RemovalPlan(self.num_units, 1, [list(range(self.num_units))], steps)

    def max_steps(self) -> int:
        return self.num_units - 1

    def curve_steps(self) -> int:
        return self.num_units

    def width_after(self, steps: int) -> int:
        return self.num_units - steps

    def params_per_step(self) -> int:
        blocks, conv1d = self.layout.producer_blocks, self.layout.conv1d
        return sum(_row_params(lin, blocks, conv1d) for lin in self.producer_linears) + self.consumer_outputs

    def num_params(self) -> int:
        return count_parameters(*_distinct(*self.producer_linears, self.consumer_linear))

    def apply(self, decision: Decision) -> None:
        rows = self.layout.producer_rows(decision.keep, self.num_units)
        for producer in self.producer_linears:
            keep_rows(producer, rows, self.layout.conv1d)
        self.bias_added = fold_into_consumer(self.consumer_linear, decision, self.layout.conv1d)
        if hasattr(self.parent, "intermediate_size"):
            self.parent.intermediate_size = self.num_units

    def shape(self) -> LayerShape:
        return LayerShape(intermediate_size=self.num_units, mlp_output_bias=self.bias_added)

    def shape_before(self) -> LayerShape:
        return LayerShape(intermediate_size=self.width_before)

    def shape_after(self, steps: int, bias_added: bool = False) -> LayerShape:
        return LayerShape(intermediate_size=self.width_after(steps), mlp_output_bias=bias_added)

    def reshape_to(self, shape: LayerShape) -> None:
        self.apply(self._placeholder_decision(self.num_units - shape.intermediate_size, shape.mlp_output_bias))


class HeadSite(ConsumerSite):
    """Attention heads: groups of ``head_dim`` units entering the output projection.

    Multi-head attention removes heads freely (q, k and v rows go with the head). Under GQA
    the layer must stay a valid GQA layer: ``per_group`` removes the same number of query
    heads from every KV group (k and v stay), ``kv_groups`` removes whole KV groups with all
    their query heads.
    """

    kind = "heads"
    fields = HEAD_FIELDS

    def __init__(self, layer: nn.Module, index: int, layout: AttentionLayout, head_dim: int, gqa_mode: str):
        super().__init__(layer, index)
        self.layout, self.head_dim, self.gqa_mode = layout, head_dim, gqa_mode
        self.heads_before, self.kv_heads_before = self.num_heads, self.num_kv_heads

    @property
    def attention(self) -> nn.Module:
        return self.layer.get_submodule(self.layout.parent)

    def _linear(self, name: str) -> nn.Module | None:
        return getattr(self.attention, name, None)

    @property
    def consumer_linear(self) -> nn.Module:
        return self._linear(self.layout.o)

    @property
    def num_heads(self) -> int:
        return self.num_units // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.layout.num_kv_heads(self.attention, self.num_heads, self.head_dim)

    @property
    def heads_per_kv(self) -> int:
        return self.num_heads // max(self.num_kv_heads, 1)  # 0 for a layer that lost every head

    @property
    def mode(self) -> str:
        """``mha`` (every head has its own k/v), else the GQA mode."""
        return "mha" if self.num_heads == self.num_kv_heads else self.gqa_mode

    def plan(self, steps: int) -> RemovalPlan:
        heads, per_kv = self.num_heads, self.heads_per_kv
        if self.mode == "mha":
            return RemovalPlan(self.num_units, self.head_dim, [list(range(heads))], steps)
        if self.mode == "kv_groups":
            return RemovalPlan(self.num_units, self.head_dim * per_kv, [list(range(self.num_kv_heads))], steps)
        pools = [list(range(g * per_kv, (g + 1) * per_kv)) for g in range(self.num_kv_heads)]
        return RemovalPlan(self.num_units, self.head_dim, pools, steps)

    def max_steps(self) -> int:
        return self.heads_per_kv if self.mode == "per_group" else self.num_kv_heads

    @property
    def query_heads_per_step(self) -> int:
        return {"mha": 1, "kv_groups": self.heads_per_kv, "per_group": self.num_kv_heads}[self.mode]

    def width_after(self, steps: int) -> int:
        return self.num_heads - steps * self.query_heads_per_step

    def _kv_rows_params(self, kv_heads: int) -> int:
        """Parameters of ``kv_heads`` key heads and as many value heads (rows of k and v, fused or not)."""
        rows = kv_heads * self.head_dim
        conv1d = self.layout.conv1d
        return _row_params(self._linear(self.layout.k), rows, conv1d) + _row_params(self._linear(self.layout.v), rows,
                                                                                    conv1d)

    def params_per_step(self) -> int:
        query_heads = self.query_heads_per_step
        kv_heads = 0 if self.mode == "per_group" else 1
        d = self.head_dim
        q_rows = _row_params(self._linear(self.layout.q), query_heads * d, self.layout.conv1d)
        return q_rows + query_heads * d * self.consumer_outputs + self._kv_rows_params(kv_heads)

    def params_removed(self, steps: int) -> int:
        removed = steps * self.params_per_step()
        if self.mode == "per_group" and steps == self.max_steps():  # no query head left: k and v go too
            removed += self._kv_rows_params(self.num_kv_heads)
        return removed

    def num_params(self) -> int:
        names = (self.layout.q, self.layout.k, self.layout.v, self.layout.o)
        return count_parameters(*_distinct(*(self._linear(n) for n in names)))

    def kept_heads(self, decision: Decision) -> tuple[list[int], list[int]]:
        """The query and key/value heads a decision keeps (what ``apply`` cuts to)."""
        removed, per_kv = set(decision.removed_groups), self.heads_per_kv
        if self.mode == "kv_groups":
            drop_kv, drop_q = removed, {g * per_kv + r for g in removed for r in range(per_kv)}
        else:
            drop_q, drop_kv = removed, removed if self.mode == "mha" else set()
        return ([h for h in range(self.num_heads) if h not in drop_q],
                [h for h in range(self.num_kv_heads) if h not in drop_kv])

    def apply(self, decision: Decision) -> None:
        num_heads, num_kv_heads = self.num_heads, self.num_kv_heads
        keep_q, keep_kv = self.kept_heads(decision)
        output = self.consumer_linear
        self.bias_added = fold_into_consumer(output, decision, self.layout.conv1d)
        if not keep_q:
            make_empty_attention(self.layer, self.layout, output, self.head_dim)
            return
        rows = self.layout.projection_rows(keep_q, keep_kv, num_heads, num_kv_heads, self.head_dim)
        for name, kept in rows.items():
            keep_rows(self._linear(name), kept, self.layout.conv1d)
        self.layout.set_head_counts(self.attention, len(keep_q), len(keep_kv))

    def reshape_to(self, shape: LayerShape) -> None:
        removed_heads = self.num_heads - shape.num_attention_heads
        steps = {"mha": removed_heads, "kv_groups": self.num_kv_heads - shape.num_key_value_heads,
                 "per_group": removed_heads // max(self.num_kv_heads, 1)}[self.mode]
        self.apply(self._placeholder_decision(steps, shape.attention_output_bias))

    def shape(self) -> LayerShape:
        return LayerShape(num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                          attention_output_bias=self.bias_added)

    def shape_before(self) -> LayerShape:
        return LayerShape(num_attention_heads=self.heads_before, num_key_value_heads=self.kv_heads_before)

    def shape_after(self, steps: int, bias_added: bool = False) -> LayerShape:
        heads = self.width_after(steps)
        kv_heads = {"mha": heads, "kv_groups": self.num_kv_heads - steps,
                    "per_group": self.num_kv_heads if heads else 0}[self.mode]
        return LayerShape(num_attention_heads=heads, num_key_value_heads=kv_heads, attention_output_bias=bias_added)

