"""VBP: keep the highest-variance units and fold the removed units' means into the bias."""

from __future__ import annotations

import torch

from ..stats import SiteStatistics
from .base import Decision, MethodOptions, PruningMethod, RemovalPlan, register_method, select_by_score


@register_method
class VBP(PruningMethod):
    """Variance-Based Pruning with mean-shift compensation (arXiv 2507.12988).

    The mean shift b' = b + W_P mu_P is the method's defining step, so where the consumer
    has no bias (Llama ``down_proj``) one is added unless ``add_bias=False``.
    """

    name = "vbp"
    wants_added_bias = True

    def decide(self, stats: SiteStatistics, plan: RemovalPlan, bias_available: bool, options: MethodOptions, site_key: int) -> Decision:
        sigma, mu = stats.moments(centered=True)
        group_variance = sigma.diagonal().reshape(plan.num_groups, plan.group_size).sum(1)
        decision = plan.decision(select_by_score(group_variance, plan), sigma.device)
        if bias_available and len(decision.drop):
            decision.shift = mu[decision.drop]
        return decision


@register_method
class RandomPruning(PruningMethod):
    """Baseline: remove random units (seeded), no compensation."""

    name = "random"

    def decide(self, stats: SiteStatistics, plan: RemovalPlan, bias_available: bool, options: MethodOptions, site_key: int) -> Decision:
        generator = torch.Generator().manual_seed(options.seed * 100_003 + site_key)
        return plan.decision(select_by_score(torch.rand(plan.num_groups, generator=generator), plan), stats.sum.device)
