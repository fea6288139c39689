"""What a method may read of one site (:class:`SiteInputs`), and the part of a method a site calls
(:class:`Decides`): the two ends of the method side of a site (``hf_snp.units.protocols``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import torch

from .removal import Decision, RemovalPlan
from .stats import CrossMoments, SiteStatistics

if TYPE_CHECKING:
    from ..config import PruneConfig


@dataclass
class SiteInputs:
    """What a method may look at for one site."""

    stats: SiteStatistics
    plan: RemovalPlan
    bias_available: bool  # the consumer has a bias, or one may be added
    consumer_weight: torch.Tensor  # W of the consumer linear (float32/64, on the stats device)
    key: int  # a stable id of the site, for seeding
    cross: CrossMoments | None = None  # dense-target reconstruction where the streams differ (docs/design.md §3.7)

    @cached_property
    def objective_weight(self) -> torch.Tensor:
        """The W whose output error SNP's decisions measure: the consumer's, or after a post-norm S^½ W times
        sqrt(the tokens' mean weight), so that errors are sums over tokens / T after the norm at first order
        (``hf_snp.units.stats.PostNormMetric``, docs/design.md §3.11)."""
        metric = self.stats.post_norm
        if metric is None:
            return self.consumer_weight
        weight = self.consumer_weight
        root = metric.root(sum(self.stats.fold_weights)).to(weight)
        return (root @ weight) * self.stats.mean_weight ** 0.5


class Decides(Protocol):
    """The part of a pruning method a site calls (``hf_snp.methods.base.PruningMethod``)."""

    def decide(self, site: SiteInputs, config: "PruneConfig") -> Decision: ...
