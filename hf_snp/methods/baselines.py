"""Baseline scorers (docs/design.md §4.2) in the same engine (same calibration, sites, budgets and save path).

Each scores the groups a plan may remove and takes the lowest first; none reconstructs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..units.removal import group_sums, select_by_score
from .base import PruningMethod, ScoredMethod, SiteInputs, register_method

if TYPE_CHECKING:
    from ..config import PruneConfig


@register_method
class FLAP(ScoredMethod):
    """FLAP (An et al., AAAI 2024; CASIA-IVA-Lab/FLAP, ``lib/prune.py`` ``prune_flap`` with its default metric
    'WIFV'): per input channel j of the consumer, the fluctuation (variance over the calibration tokens) times
    the squared norm of the weight column it feeds, ``m_j = var(X_j) * ||W_:,j||^2``. On heads (the attention
    output projection) the metric is squared, ``m_j^2``, as FLAP does for ``o_proj``. FLAP standardises the
    channel metrics within each layer, ``z_j = (m_j - mean(m)) / std(m)`` (over the site's channels, unbiased
    std), and a head's score is the mean of its channels' ``z_j`` (GQA: ranked within each KV group's pool; a
    whole KV group: the mean over all its channels). The removed units' means are folded into the bias (FLAP's
    bias compensation).

    Within a site the ranking is that of the raw metric (heads: the per-head sum of ``m_j^2``), FLAP's uniform
    structure; the order's costs are ``m / std(m)`` (group means), and ``global_scores`` subtracts their mean
    over the site's full curve, which gives FLAP's standardised scores, compared across sites as its adaptive
    structure search does (docs/design.md §4.2, §6.3).
    """

    name = "flap"
    wants_added_bias = True

    @staticmethod
    def metric(site: SiteInputs) -> torch.Tensor:
        """m_j = var(X_j) * ||W_:,j||^2 per unit (FLAP's 'WIFV')."""
        variance = site.stats.moments(centered=True)[0].diagonal()
        return variance * site.consumer_weight.to(variance).pow(2).sum(0)

    def scores(self, site: SiteInputs) -> torch.Tensor:
        metric = self.metric(site)
        size = site.plan.group_size
        if size > 1:  # heads: FLAP squares the o_proj metric
            metric = metric.pow(2)
        spread = metric.std().clamp_min(1e-12) if metric.numel() > 1 else metric.new_ones(())
        return metric / (spread * size)  # a group's sum: the mean of its channels, in units of std(m)

    def output_errors(self, site: SiteInputs, config: "PruneConfig") -> list[float]:
        """allocation='output_error' (docs/design.md §6.4): per step of the order, the group's sum of the unsquared
        m_j, what its removal adds to the consumer-output error with the mean fold if the units were uncorrelated."""
        removed, _ = self.order(site, config)
        metric = group_sums(self.metric(site), site.plan)
        return [float(metric[g]) for g in removed]

    def global_scores(self, costs: list[float]) -> list[float]:
        """Standardised per site: the costs (m / std(m), one per group of the full curve, which covers every
        channel once) less their mean, i.e. (m - mean(m)) / std(m) averaged per group, made non-decreasing."""
        values = torch.tensor(costs, dtype=torch.float64)
        centred = values - values.mean() if len(costs) else values
        return super().global_scores(centred.tolist())


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
