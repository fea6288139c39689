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

Both observe the experts through ``ExpertLayer`` (``hf_snp.units.expert_layer``), which during the statistics pass
runs the experts module as a reference loop (the maths of the eager ``MixtralExperts.forward``) that also feeds
the statistics; the shared expert (Qwen2-MoE) is an ordinary MLP site.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..models.modeling_hf_snp import ExpertsLayout, LayerShape
from .expert_layer import ExpertEnergy, ExpertLayer
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
    single_units = True
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

