"""SNP's per-site choice by held-out error (ordering='heldout', docs/design.md §3.12).

Each candidate is a whole decision: which units go and how the consumer makes up for them. OBS's order and the
unnormalised-ZCA order, each with the least-squares map whose ridge predicts held-out tokens best, and VBP's
variance order with the mean shift (no map). Every candidate is scored by the same held-out error, the consumer
output (after its post-norm, §3.11) of the held-out fold's removed units predicted from the other folds' statistics;
the least wins (ties: the earlier candidate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..units.removal import Decision
from ..units.ridge import heldout_mean_error, ridge_and_error
from ..units.site_inputs import SiteInputs

if TYPE_CHECKING:
    from ..config import PruneConfig

CANDIDATES = ("obs", "zca", "variance")  # the orders compared, in the order ties are broken


class Orders(Protocol):
    """What the choice needs of SNP: its orders by name, and its compensation of a decision."""

    def order(self, site: SiteInputs, config: "PruneConfig", ordering: str | None = None
              ) -> tuple[list[int], list[float]]: ...

    def compensate(self, site: SiteInputs, decision: Decision, config: "PruneConfig") -> None: ...


def candidate_errors(method: Orders, site: SiteInputs, config: "PruneConfig") -> list[tuple[str, Decision, float]]:
    """Every candidate's decision (ridge set, not yet compensated) and held-out error; a candidate whose removed
    groups equal an earlier one's is skipped (the same units: the map candidates would be the same decision)."""
    found: list[tuple[str, Decision, float]] = []
    seen: list[set[int]] = []
    centered = site.bias_available
    for name in CANDIDATES:
        removed, _ = method.order(site, config, name)
        if name != "variance" and set(removed) in seen:
            continue
        seen.append(set(removed))
        decision = site.plan.decision(removed, site.stats.shifted_sum.device)
        decision.choice = name
        if not len(decision.drop):
            error = 0.0
        elif name == "variance" or not len(decision.keep):
            decision.choice = "variance"  # nothing kept: the mean (or nothing) is the only prediction
            error = heldout_mean_error(site.stats, centered, site.objective_weight, decision.drop)
        else:
            decision.ridge, error = ridge_and_error(site.stats, centered, site.objective_weight, decision.keep,
                                                    decision.drop, config.damping)
        found.append((name, decision, float("inf") if error is None else error))
    return found


def choose_decision(method: Orders, site: SiteInputs, config: "PruneConfig") -> Decision:
    """The candidate decision with the least held-out error, compensated (its map or its mean shift)."""
    found = candidate_errors(method, site, config)
    _, decision, _ = min(found, key=lambda item: item[2])
    decision.candidate_errors = {name: error for name, _, error in found}
    method.compensate(site, decision, config)
    return decision
