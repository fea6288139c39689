"""VBP: keep the highest-variance units and fold the removed units' means into the bias."""

from __future__ import annotations

import torch

from .base import MethodOptions, PruningMethod, ScoredMethod, SiteInputs, register_method, select_by_score


@register_method
class VBP(ScoredMethod):
    """Variance-Based Pruning with mean-shift compensation (arXiv 2507.12988).

    The mean shift b' = b + W_P mu_P is the method's defining step, so where the consumer
    has no bias (Llama ``down_proj``) one is added unless ``add_bias=False``. Globally, units
    are ranked by their raw variance across layers, as in the paper.
    """

    name = "vbp"
    wants_added_bias = True

    def scores(self, site: SiteInputs) -> torch.Tensor:
        return site.stats.moments(centered=True)[0].diagonal()


@register_method
class RandomPruning(PruningMethod):
    """Baseline: remove random units (seeded), no compensation."""

    name = "random"

    def order(self, site: SiteInputs, options: MethodOptions) -> tuple[list[int], list[float]]:
        generator = torch.Generator().manual_seed(options.seed * 100_003 + site.key)
        removed = select_by_score(torch.rand(site.plan.num_groups, generator=generator), site.plan)
        return removed, [1.0] * len(removed)

    def compensate(self, site: SiteInputs, decision, options: MethodOptions) -> None:
        return None
