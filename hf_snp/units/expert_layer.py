"""One layer's mixture of experts as its sites see it (docs/design.md §5.4): the stacked experts module, its
router, the observing forward and the cuts waiting to be applied together (the sites: ``hf_snp.units.experts``).

transformers 5.x keeps a layer's routed experts in one module whose parameters are stacked:
``gate_up_proj`` [E, 2I, H] (every gate row, then every up row) and ``down_proj`` [E, H, I], called as
``experts(x, top_k_index, top_k_weights)``: token t goes to its top-k experts and gets
``sum_k w_tk * down_e(act(gate_e x_t) * up_e x_t)``. During the statistics pass :class:`ExpertLayer` runs the
experts module as a reference loop (the maths of the eager ``MixtralExperts.forward``) that also feeds each
expert's statistics (``w_t * h_t`` over its routed tokens) and the experts' routed-output energies
(:class:`ExpertEnergy`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..models.modeling_hf_snp import ExpertsLayout
from .removal import Decision
from .stats import SiteStatistics


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
