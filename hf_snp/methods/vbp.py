"""VBP: keep the highest-variance units and fold the removed units' means into the bias (docs/design.md §4.1)."""

from __future__ import annotations

import torch

from .base import ScoredMethod, SiteInputs, register_method


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
