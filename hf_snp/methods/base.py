"""The method registry: a method turns one site's statistics into a Decision (it sees the site only as
``SiteInputs``, ``hf_snp.units.site_inputs``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import register_choices
from ..units.removal import Decision, group_sums, select_by_score
from ..units.site_inputs import SiteInputs

if TYPE_CHECKING:
    from ..config import PruneConfig


class PruningMethod:
    """Base class. A method orders the groups a plan may remove (each step with its cost),
    and compensates the consumer for the removed ones.

    ``order`` follows ``plan.schedule`` and returns the removed groups and one cost per step
    (what that removal loses; the global allocation compares these across sites).
    ``global_scores`` turns a site's costs into the increasing scores a global threshold cuts.
    """

    name: ClassVar[str] = ""
    wants_added_bias: ClassVar[bool] = False  # default of add_bias=None for bias-less consumers
    weighs_post_norm: ClassVar[bool] = False  # errors measured after a post-norm (docs/design.md §3.11)

    def bias_available(self, consumer_has_bias: bool, can_add_bias: bool, add_bias: bool | None) -> bool:
        """Whether a site's consumer has a bias after the cut: its own, or one added where a module can hold it
        (``add_bias`` when set, else this method's preference)."""
        if consumer_has_bias:
            return True
        if not can_add_bias:  # e.g. stacked experts: no module to hold a bias
            return False
        return self.wants_added_bias if add_bias is None else add_bias

    def order(self, site: SiteInputs, config: "PruneConfig") -> tuple[list[int], list[float]]:
        raise NotImplementedError

    def compensate(self, site: SiteInputs, decision: Decision, config: "PruneConfig") -> None:
        """Fill decision.coef / decision.shift (default: fold the removed units' means where possible)."""
        if site.bias_available and len(decision.drop):
            decision.shift = site.stats.moments(centered=True)[1][decision.drop]

    def decide(self, site: SiteInputs, config: "PruneConfig") -> Decision:
        removed, _ = self.order(site, config)
        decision = site.plan.decision(removed, site.stats.shifted_sum.device)
        self.compensate(site, decision, config)
        return decision

    def output_errors(self, site: SiteInputs, config: "PruneConfig") -> list[float]:
        """The costs allocation='output_error' compares across sites (docs/design.md §6.4), one per step of
        ``site.plan``: the consumer-output error each removal adds where the method can say (SNP); by default the
        method's own step costs."""
        return self.order(site, config)[1]

    def global_scores(self, costs: list[float]) -> list[float]:
        """Cumulative fraction of the site's total cost removed after each step (normalised per site)."""
        total = sum(costs) or 1.0
        running, scores = 0.0, []
        for cost in costs:
            running += cost
            scores.append(running / total)
        return scores


class ScoredMethod(PruningMethod):
    """Removes the lowest-scored groups (a group's score: the sum of its units'); a step's cost
    is its score, and globally the raw scores form one ranking across sites."""

    def scores(self, site: SiteInputs) -> torch.Tensor:
        raise NotImplementedError

    def order(self, site: SiteInputs, config: "PruneConfig") -> tuple[list[int], list[float]]:
        scores = group_sums(self.scores(site), site.plan)
        removed = select_by_score(scores, site.plan)
        return removed, [float(scores[g]) for g in removed]

    def global_scores(self, costs: list[float]) -> list[float]:
        """Raw scores, made non-decreasing."""
        scores, running = [], float("-inf")
        for cost in costs:
            running = max(running, cost)
            scores.append(running)
        return scores


METHODS: dict[str, type[PruningMethod]] = {}
register_choices("method", lambda: sorted(METHODS))


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available as ``method=cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> PruningMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]()
