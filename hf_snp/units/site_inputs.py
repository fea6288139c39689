"""What a method may read of one site (:class:`SiteInputs`), and the part of a method a site calls
(:class:`Decides`): the two ends of the method side of a site (``hf_snp.units.protocols``)."""

from __future__ import annotations

from dataclasses import dataclass
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


class Decides(Protocol):
    """The part of a pruning method a site calls (``hf_snp.methods.base.PruningMethod``)."""

    def decide(self, site: SiteInputs, config: "PruneConfig") -> Decision: ...
