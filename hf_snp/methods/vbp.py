"""VBP: keep the highest-variance units and fold the removed units' means into the bias."""

from __future__ import annotations

import torch

from ..stats import SiteStatistics
from .base import Decision, MethodOptions, PruningMethod, register_method, split


@register_method
class VBP(PruningMethod):
    """Variance-Based Pruning with mean-shift compensation (arXiv 2507.12988).

    The mean shift b' = b + W_P mu_P is the method's defining step, so where the consumer
    has no bias (Llama ``down_proj``) one is added unless ``add_bias=False``.
    """

    name = "vbp"
    wants_added_bias = True

    def decide(self, stats: SiteStatistics, num_remove: int, bias_available: bool, options: MethodOptions, site_key: int) -> Decision:
        sigma, mu = stats.moments(centered=True)
        variance = sigma.diagonal()
        order = torch.argsort(variance, stable=True)
        keep, drop = split(stats.n, order[:num_remove], sigma.device)
        shift = mu[drop] if bias_available and len(drop) else None
        return Decision(keep, drop, None, shift, {"variance_removed": float(variance[drop].sum())})


@register_method
class RandomPruning(PruningMethod):
    """Baseline: remove random units (seeded), no compensation."""

    name = "random"

    def decide(self, stats: SiteStatistics, num_remove: int, bias_available: bool, options: MethodOptions, site_key: int) -> Decision:
        generator = torch.Generator().manual_seed(options.seed * 100_003 + site_key)
        order = torch.randperm(stats.n, generator=generator)
        keep, drop = split(stats.n, order[:num_remove], stats.sum.device)
        return Decision(keep, drop)
