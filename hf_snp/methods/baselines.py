"""Baseline scorers (docs/design.md §4.2) in the same engine (same calibration, sites, budgets and save path).

Each scores the groups a plan may remove and takes the lowest first; none reconstructs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..removal import select_by_score
from .base import PruningMethod, ScoredMethod, SiteInputs, register_method

if TYPE_CHECKING:
    from ..config import PruneConfig


@register_method
class FLAP(ScoredMethod):
    """FLAP (An et al., AAAI 2024): fluctuation of each input unit (its variance over the
    calibration tokens) times the squared norm of the weight column it feeds, with the removed
    units' means folded into the bias (FLAP's bias compensation). Globally, scores are
    standardised per site before one ranking, as FLAP's adaptive structure search does.
    """

    name = "flap"
    wants_added_bias = True

    def scores(self, site: SiteInputs) -> torch.Tensor:
        variance = site.stats.moments(centered=True)[0].diagonal()
        return variance * site.consumer_weight.to(variance).pow(2).sum(0)

    def global_scores(self, costs: list[float]) -> list[float]:
        values = torch.tensor(costs, dtype=torch.float64)
        standardised = (values - values.mean()) / values.std().clamp_min(1e-12) if len(costs) > 1 else values
        return super().global_scores(standardised.tolist())


@register_method
class WandaSP(ScoredMethod):
    """Structured Wanda: the input unit's norm over the calibration tokens, ||X_j||_2, times the
    absolute weights it feeds, sum_i |W_ij|. No compensation."""

    name = "wanda_sp"

    def compensate(self, site: SiteInputs, decision, config: "PruneConfig") -> None:
        return None

    def scores(self, site: SiteInputs) -> torch.Tensor:
        second_moment = site.stats.moments(centered=False)[0].diagonal()
        norm = (second_moment * site.stats.count).clamp_min(0).sqrt()
        return norm * site.consumer_weight.to(norm).abs().sum(0)


@register_method
class Magnitude(ScoredMethod):
    """The L2 norm of the weight column each unit feeds; data-free. No compensation."""

    name = "magnitude"

    def compensate(self, site: SiteInputs, decision, config: "PruneConfig") -> None:
        return None

    def scores(self, site: SiteInputs) -> torch.Tensor:
        return site.consumer_weight.to(torch.float64).pow(2).sum(0).sqrt()


@register_method
class RandomPruning(PruningMethod):
    """Baseline: remove random units (seeded), no compensation."""

    name = "random"

    def order(self, site: SiteInputs, config: "PruneConfig") -> tuple[list[int], list[float]]:
        generator = torch.Generator().manual_seed(config.seed * 100_003 + site.key)
        removed = select_by_score(torch.rand(site.plan.num_groups, generator=generator), site.plan)
        return removed, [1.0] * len(removed)

    def compensate(self, site: SiteInputs, decision, config: "PruneConfig") -> None:
        return None
