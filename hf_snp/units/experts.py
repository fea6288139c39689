"""Mixtures of experts (docs/design.md §5.4): each routed expert's MLP neurons, and whole experts.

transformers 5.x keeps a layer's routed experts in one module whose parameters are stacked:
``gate_up_proj`` [E, 2I, H] (every gate row, then every up row) and ``down_proj`` [E, H, I], called as
``experts(x, top_k_index, top_k_weights)``: token t goes to its top-k experts and gets
``sum_k w_tk * down_e(act(gate_e x_t) * up_e x_t)``. The router (``mlp.gate``) is left as it is.

* :class:`ExpertSite` (target "mlp"): the neurons of one expert. Its statistics are those of
  ``w_t * h_t`` over the tokens routed to it (``h_t = act(gate_e x_t) * up_e x_t``, ``w_t`` the routing weight):
  the expert's output enters the residual stream as ``w_t * W h_t`` and ``W`` (``down_proj[e]``) is linear with no
  bias, so the least-squares reconstruction on these moments minimises ``sum_t ||w_t W (h_t - h^_t)||^2``, the
  error of what the expert adds to the residual stream; tokens the router weighs little count little. The
  stacked layout holds one width per layer, so the cuts of a layer's experts are applied together once all of
  them are decided, and they must remove the same number of units (uniform allocation does); each expert
  chooses its own units. Widths are multiples of 8 (``EXPERT_WIDTH_MULTIPLE``: the grouped GEMM of transformers'
  default experts implementation needs 16-byte rows). No bias can be added (VBP's mean shift is skipped,
  ``add_bias=True`` is refused).
* :class:`ExpertSetSite` (target "experts"): whole experts, ranked by the energy of their routed output,
  ``sum_t ||w_t * expert_e(x_t)||^2`` over the calibration tokens, lowest removed first (ties: lower index),
  whatever the method; their router rows and stacked slices go. At least ``top_k`` experts stay.

Both observe the experts through :class:`ExpertLayer`, which during the statistics pass runs the experts module
as a reference loop (the maths of the eager ``MixtralExperts.forward``) that also feeds the statistics.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..models.modeling_hf_snp import ExpertsLayout, LayerShape
from .protocols import Site
from .removal import Decision, RemovalPlan, select_by_score, split
from .site_inputs import Decides, SiteInputs
from .sites import ConsumerSite, MlpSite
from .stats import SiteStatistics

if TYPE_CHECKING:
    from ..config import PruneConfig

logger = logging.getLogger("hf_snp")

# transformers' default experts implementation (``grouped_mm``: torch's grouped GEMM, on CPU and CUDA) needs rows of
# 16 bytes: an expert width of a multiple of 8 in 16-bit weights (4 in float32). Widths in between fail at runtime
# ("strides should be multiple of 16 bytes"), so expert sites only take multiples of 8.
EXPERT_WIDTH_MULTIPLE = 8


class _Handle:
    def __init__(self, remove: Callable[[], None]):
        self._remove = remove

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


class ExpertEnergy:
    """Per expert: the energy of its routed, weighted output ``sum_t ||w_t y_t||^2`` and the tokens it got."""

    def __init__(self, name: str, num_experts: int, device: torch.device):
        self.name = name
        self.energy = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(num_experts, dtype=torch.long, device=device)
        self.token_mask: torch.Tensor | None = None  # set by the engine for each batch ([B*L] bool)

    @property
    def count(self) -> int:
        return int(self.tokens.sum())

    def add(self, expert: int, weighted: torch.Tensor) -> None:
        if not torch.isfinite(weighted).all():
            raise ValueError(f"NaN or inf in the output of {self.name}, expert {expert}")
        self.energy[expert] += weighted.to(self.energy).pow(2).sum()
        self.tokens[expert] += weighted.shape[0]


def _feed(stats: SiteStatistics, rows: torch.Tensor, kept: torch.Tensor | None) -> None:
    """``stats.update`` with the routed rows (the engine's token mask is per batch token, these are routed ones)."""
    full, stats.token_mask = stats.token_mask, kept
    try:
        stats.update(rows)
    finally:
        stats.token_mask = full


def _gated(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up of the [gate; up] projection (the module's own ``_apply_gate`` where it has one)."""
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


class ExpertLayer:
    """One layer's mixture of experts, shared by its sites: the stacked experts module and the router, the
    reference forward that observes them during the statistics pass, and the per-expert cuts waiting to be
    applied together."""

    def __init__(self, layer: nn.Module, index: int, layout: ExpertsLayout):
        self.index, self.layout = index, layout
        self.block = layout.block(layer)
        self.done = nn.Identity()  # called after the experts were observed: the engine's stop point
        self.expert_stats: dict[int, SiteStatistics] = {}
        self.energy: ExpertEnergy | None = None
        self.pending: dict[int, Decision] = {}
        self._original_forward = None

    @property
    def experts(self) -> nn.Module:
        return getattr(self.block, self.layout.experts)

    @property
    def router(self) -> nn.Module:
        return getattr(self.block, self.layout.router)

    @property
    def num_experts(self) -> int:
        return self.experts.down_proj.shape[0]

    @property
    def width(self) -> int:
        return self.experts.down_proj.shape[-1]

    @property
    def hidden(self) -> int:
        return self.experts.down_proj.shape[1]

    @property
    def top_k(self) -> int:
        return int(getattr(self.router, "top_k", 1))

    # --- observing ---------------------------------------------------------------------------------------

    def attach(self, expert: int | None, stats) -> _Handle:
        """Feed ``stats`` (an expert's ``SiteStatistics``, or with ``expert`` None the ``ExpertEnergy``) while
        attached; the first attachment swaps in the reference forward, the last removal restores the module's."""
        if expert is None:
            self.energy = stats
        else:
            self.expert_stats[expert] = stats
        if self._original_forward is None:
            experts = self.experts
            self._original_forward = experts.__dict__.get("forward", False)
            experts.forward = self.forward

        def detach() -> None:
            if expert is None:
                self.energy = None
            else:
                self.expert_stats.pop(expert, None)
            if not self.expert_stats and self.energy is None and self._original_forward is not None:
                experts = self.experts
                if self._original_forward is False:
                    del experts.forward
                else:
                    experts.forward = self._original_forward
                self._original_forward = None

        return _Handle(detach)

    def _token_mask(self) -> torch.Tensor | None:
        for stats in (*self.expert_stats.values(), self.energy):
            if stats is not None:
                return stats.token_mask
        return None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """The eager experts forward (a loop over experts), feeding the attached statistics on the way."""
        experts = self.experts
        out = torch.zeros_like(hidden_states)
        mask = self._token_mask()
        for expert in range(experts.down_proj.shape[0]):
            tokens, slot = torch.where(top_k_index == expert)
            if tokens.numel() == 0:
                continue
            units = _gated(experts, F.linear(hidden_states[tokens], experts.gate_up_proj[expert]))
            weight = top_k_weights[tokens, slot, None]
            weighted = F.linear(units, experts.down_proj[expert]) * weight
            out.index_add_(0, tokens, weighted.to(out.dtype))
            kept = None if mask is None else mask.to(tokens.device)[tokens]
            if expert in self.expert_stats:
                _feed(self.expert_stats[expert], units * weight, kept)
            if self.energy is not None:
                self.energy.add(expert, weighted if kept is None else weighted[kept])
        self.done(out)
        return out

    # --- cutting -----------------------------------------------------------------------------------------

    def stage(self, expert: int, decision: Decision) -> None:
        """Keep ``expert``'s decision; once every expert has one, cut them all (the stacked layout holds one
        width per layer)."""
        if decision.shift is not None:
            raise ValueError(f"layer {self.index}: a routed expert has no bias to take a mean shift")
        self.pending[expert] = decision
        if len(self.pending) == self.num_experts:
            self._commit()

    def check_committed(self) -> None:
        if self.pending:
            raise RuntimeError(f"layer {self.index}: only experts {sorted(self.pending)} of {self.num_experts} were "
                               "cut; the stacked expert weights need the same width in every expert of a layer")

    @torch.no_grad()
    def _commit(self) -> None:
        experts, width = self.experts, self.width
        decisions = [self.pending[e] for e in range(self.num_experts)]
        self.pending = {}
        widths = {len(d.keep) for d in decisions}
        if len(widths) != 1:
            raise ValueError(f"layer {self.index}: the experts would keep {sorted(widths)} units; the stacked expert "
                             "weights need the same width in every expert of a layer (uniform allocation)")
        gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
        rows, columns = [], []
        for expert, decision in enumerate(decisions):
            keep = decision.keep.to(gate_up.device)
            rows.append(gate_up[expert, torch.cat([keep, keep + width])])
            columns.append(decision.fold(down[expert].to(torch.float64))[0].to(down.dtype))
        grad = experts.down_proj.requires_grad
        experts.gate_up_proj = nn.Parameter(torch.stack(rows).contiguous(), requires_grad=grad)
        experts.down_proj = nn.Parameter(torch.stack(columns).contiguous(), requires_grad=grad)
        if hasattr(experts, "intermediate_dim"):
            experts.intermediate_dim = widths.pop()

    @torch.no_grad()
    def keep_experts(self, keep: torch.Tensor) -> None:
        """Keep only the experts ``keep`` (sorted): their stacked slices and router rows."""
        experts, router = self.experts, self.router
        keep = keep.to(experts.down_proj.device)

        def kept(param: nn.Parameter) -> nn.Parameter:
            return nn.Parameter(param.data[keep.to(param.device)].contiguous(), requires_grad=param.requires_grad)

        experts.gate_up_proj, experts.down_proj = kept(experts.gate_up_proj), kept(experts.down_proj)
        router.weight = kept(router.weight)
        if getattr(router, "bias", None) is not None:
            router.bias = kept(router.bias)
        for module in (experts, router, self.block):
            if hasattr(module, "num_experts"):
                module.num_experts = len(keep)


class _RoutedSite(ConsumerSite):
    """What the sites of a layer's routed experts share: the stacked experts module is the consumer (no bias
    can be added), its outputs are the hidden size, and the observing forward's end marks the statistics done."""

    can_add_bias = False
    moe: ExpertLayer

    @property
    def consumer_linear(self) -> nn.Module:
        return self.moe.experts

    @property
    def consumer_has_bias(self) -> bool:
        return False

    @property
    def consumer_outputs(self) -> int:
        return self.moe.hidden

    @property
    def stop_module(self) -> nn.Module:
        return self.moe.done


class ExpertSite(_RoutedSite):
    """The MLP neurons of one routed expert (target "mlp"): rows ``i`` and ``I + i`` of ``gate_up_proj[e]`` and
    column ``i`` of ``down_proj[e]``; statistics of ``w_t * h_t`` over the tokens routed to it."""

    kind = "mlp"
    fields = ("expert_intermediate_size",)
    width_multiple = EXPERT_WIDTH_MULTIPLE
    tied = True  # the stacked expert weights hold one width per layer
    layout: ExpertsLayout

    def __init__(self, layer: nn.Module, index: int, moe: ExpertLayer, expert: int):
        super().__init__(layer, index)
        self.moe, self.expert, self.layout = moe, expert, moe.layout
        self.width_before = self.num_units

    @property
    def slot(self) -> str:
        return f"expert {self.expert}"

    @property
    def consumer_weight(self) -> torch.Tensor:
        return self.moe.experts.down_proj[self.expert].detach()

    @property
    def num_units(self) -> int:
        return self.moe.width

    def new_statistics(self, device: torch.device, folds: int = 1) -> SiteStatistics:
        return SiteStatistics(f"{self.name} ({type(self.moe.experts).__name__}, routed tokens)", self.num_units,
                              device, folds)

    @property
    def ridge_name(self) -> str:
        return f"expert_{self.expert}"

    def observe(self, stats: SiteStatistics) -> list:
        return [self.moe.attach(self.expert, stats)]

    def decide(self, method: Decides, inputs: SiteInputs, config: "PruneConfig") -> Decision:
        if inputs.stats.count == 0:
            logger.warning("no calibration token was routed to %s: its units are ranked by weight magnitude "
                           "(|gate| * |up| * |down| norms) and not reconstructed", self.name)
            experts, width = self.moe.experts, self.num_units
            rows = experts.gate_up_proj[self.expert].detach().to(torch.float64).norm(dim=1)
            down = experts.down_proj[self.expert].detach().to(torch.float64).norm(dim=0)
            scores = rows[:width] * rows[width:] * down
            return inputs.plan.decision(select_by_score(scores, inputs.plan), inputs.stats.shifted_sum.device)
        inputs = dataclasses.replace(inputs, key=inputs.key + 1_000_003 * (self.expert + 1))  # a seed per expert
        return method.decide(inputs, config)

    def plan(self, steps: int) -> RemovalPlan:
        return RemovalPlan(self.num_units, 1, [list(range(self.num_units))], steps)

    def max_steps(self) -> int:
        return self.num_units - 1

    def curve_steps(self) -> int:
        return self.num_units

    def width_after(self, steps: int) -> int:
        return self.num_units - steps

    def params_per_step(self) -> int:
        return 2 * self.moe.experts.gate_up_proj.shape[-1] + self.moe.hidden  # a gate row, an up row, a column

    def num_params(self) -> int:
        return self.num_units * self.params_per_step()

    def apply(self, decision: Decision) -> None:
        self.moe.stage(self.expert, decision)

    def shape(self) -> LayerShape:
        self.moe.check_committed()
        return LayerShape(expert_intermediate_size=self.num_units)

    def shape_before(self) -> LayerShape:
        return LayerShape(expert_intermediate_size=self.width_before)

    def shape_after(self, steps: int, bias_added: bool = False) -> LayerShape:
        return LayerShape(expert_intermediate_size=self.width_after(steps))

    def reshape_to(self, shape: LayerShape) -> None:
        width = shape.expert_intermediate_size
        if width is None or width == self.num_units:
            return
        keep, drop = split(self.num_units, list(range(width, self.num_units)), torch.device("cpu"))
        self.apply(Decision(keep, drop))


class ExpertSetSite(_RoutedSite):
    """Whole routed experts of one layer (target "experts"), removed by routed-output energy, lowest first.
    A step removes one expert: its stacked slices and its router row; at least ``top_k`` experts stay."""

    kind = "experts"
    fields = ("num_experts",)
    layout: ExpertsLayout

    def __init__(self, layer: nn.Module, index: int, moe: ExpertLayer):
        super().__init__(layer, index)
        self.moe, self.layout = moe, moe.layout
        self.experts_before = self.num_units

    @property
    def slot(self) -> str:
        return "experts"

    @property
    def consumer_weight(self) -> torch.Tensor:
        return self.moe.experts.down_proj.detach()

    @property
    def num_units(self) -> int:
        return self.moe.num_experts

    def new_statistics(self, device: torch.device, folds: int = 1) -> ExpertEnergy:
        return ExpertEnergy(f"{self.name} ({type(self.moe.experts).__name__})", self.num_units, device)

    def observe(self, stats: ExpertEnergy) -> list:
        return [self.moe.attach(None, stats)]

    def decide(self, method: Decides, inputs: SiteInputs, config: "PruneConfig") -> Decision:
        """The lowest-energy experts, whatever the method (no reconstruction: the router sends their tokens to
        the next experts in its ranking)."""
        energy = inputs.stats.energy
        removed = select_by_score(energy, inputs.plan)
        logger.debug("%s: routed-output energies %s, removing %s", self.name, energy.tolist(), removed)
        return inputs.plan.decision(removed, energy.device)

    def plan(self, steps: int) -> RemovalPlan:
        return RemovalPlan(self.num_units, 1, [list(range(self.num_units))], steps)

    def max_steps(self) -> int:
        return max(self.num_units - self.moe.top_k, 0)

    def width_after(self, steps: int) -> int:
        return self.num_units - steps

    def num_params(self) -> int:
        experts, router = self.moe.experts, self.moe.router
        bias = getattr(router, "bias", None)
        return (experts.gate_up_proj.numel() + experts.down_proj.numel() + router.weight.numel()
                + (0 if bias is None else bias.numel()))

    def params_per_step(self) -> int:
        return self.num_params() // self.num_units

    def apply(self, decision: Decision) -> None:
        self.moe.check_committed()
        self.moe.keep_experts(decision.keep)

    def shape(self) -> LayerShape:
        return LayerShape(num_experts=self.num_units)

    def shape_before(self) -> LayerShape:
        return LayerShape(num_experts=self.experts_before)

    def shape_after(self, steps: int, bias_added: bool = False) -> LayerShape:
        return LayerShape(num_experts=self.width_after(steps))

    def reshape_to(self, shape: LayerShape) -> None:
        if shape.num_experts is not None and shape.num_experts < self.num_units:
            self.apply(Decision(torch.arange(shape.num_experts), torch.arange(shape.num_experts, self.num_units)))


class SharedExpertSite(MlpSite):
    """The shared expert (Qwen2-MoE): an ordinary gated MLP every token goes through, its output scaled by
    ``sigmoid(shared_expert_gate(x))``. Its statistics are the plain ``h_t``; no bias is added (it would be
    scaled by the gate, so the mean shift would not be the mean's contribution)."""

    fields = ("shared_expert_intermediate_size",)
    can_add_bias = False

    @property
    def slot(self) -> str:
        return "shared expert"

    @property
    def ridge_name(self) -> str:
        return "shared_expert"

    def shape(self) -> LayerShape:
        return LayerShape(shared_expert_intermediate_size=self.num_units)

    def shape_before(self) -> LayerShape:
        return LayerShape(shared_expert_intermediate_size=self.width_before)

    def shape_after(self, steps: int, bias_added: bool = False) -> LayerShape:
        return LayerShape(shared_expert_intermediate_size=self.width_after(steps))

    def reshape_to(self, shape: LayerShape) -> None:
        if shape.shared_expert_intermediate_size is not None:
            self.apply(self._placeholder_decision(self.num_units - shape.shared_expert_intermediate_size, False))


def moe_sites(layer: nn.Module, index: int, layout: ExpertsLayout, targets: tuple[str, ...]) -> list[Site]:
    """The sites of one layer's mixture of experts: every routed expert's neurons and the shared expert's
    ("mlp"), then the set of experts ("experts"; cut after the neurons)."""
    moe = ExpertLayer(layer, index, layout)
    sites: list[Site] = []
    if "mlp" in targets:
        sites += [ExpertSite(layer, index, moe, expert) for expert in range(moe.num_experts)]
        if layout.shared is not None:
            sites.append(SharedExpertSite(layer, index, layout.shared))
    if "experts" in targets:
        sites.append(ExpertSetSite(layer, index, moe))
    return sites

