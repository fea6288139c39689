"""SNP: unnormalised-ZCA ordering by greedy elimination and least-squares reconstruction (docs/design.md §3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..units.elimination import batched_obs_elimination, ordered_pivot_costs
from ..units.linalg import (
    dense_target_map,
    greedy_group_elimination,
    greedy_obs_elimination,
    greedy_zca_elimination,
    least_squares_map,
    swap_search,
    unreconstructed_errors,
)
from ..units.removal import Decision, group_sums, select_by_score
from ..units.ridge import choose_ridge
from .base import PruningMethod, SiteInputs, register_method
from .choice import choose_decision

if TYPE_CHECKING:
    from ..config import PruneConfig


@register_method
class SNP(PruningMethod):
    """Subspace Node Pruning (arXiv 2405.17506).

    With a bias available the statistics are centred (affine reconstruction, the bias takes
    mu_P - B mu_K); without one, the raw second moment is used so that the linear
    reconstruction is optimal with no intercept and the architecture stays stock.
    """

    name = "snp"
    weighs_post_norm = True

    def order(self, site: SiteInputs, config: PruneConfig, ordering: str | None = None
              ) -> tuple[list[int], list[float]]:
        """The removed groups in order and each step's cost, by ``ordering`` (default: the configured one; 'heldout'
        orders by OBS: its candidates are whole decisions, made in ``decide``)."""
        ordering = ordering or config.resolved_ordering
        if ordering == "heldout":
            ordering = "obs"
        moment, _ = site.stats.moments(centered=site.bias_available)
        plan = site.plan
        if ordering == "variance":  # VBP's order (the raw second moment where no intercept is fitted)
            removed = select_by_score(group_sums(moment.diagonal(), plan), plan)
            return removed, [0.0] * len(removed)
        if ordering == "obs":  # structured OBS: the reconstructed output error (docs/design.md §3.5)
            if plan.group_size == 1 and len(plan.pools) == 1:  # in batches, one host read per site (§3.10)
                found = batched_obs_elimination(moment, site.objective_weight, plan.rounds, config.damping,
                                                single=True)
                return found.removed, found.errors
            return greedy_group_elimination(moment, plan, config.damping, site.objective_weight, update_weight=True)
        if ordering in ("zca", "output_aware"):
            weight = site.objective_weight if ordering == "output_aware" else None
            if plan.group_size == 1 and len(plan.pools) == 1:
                energy = None if weight is None else weight.to(moment).pow(2).sum(0)
                return greedy_zca_elimination(moment, plan.rounds, config.damping, energy)
            return greedy_group_elimination(moment, plan, config.damping, weight)
        if ordering == "natural":  # keep the first units: remove from the end
            scores = -torch.arange(plan.num_groups, dtype=torch.float64)
        else:  # random
            scores = torch.rand(plan.num_groups,
                                generator=torch.Generator().manual_seed(config.seed * 100_003 + site.key),
                                dtype=torch.float64)
        removed = select_by_score(scores, plan)
        kept = [g for g in range(plan.num_groups) if g not in set(removed)]
        costs = ordered_pivot_costs(moment, kept + removed[::-1], plan.group_size, config.damping)[len(kept):][::-1]
        return removed, costs

    def output_errors(self, site: SiteInputs, config: PruneConfig) -> list[float]:
        """The consumer-output error each removal of this site's order adds (allocation='output_error',
        docs/design.md §6.4): OBS's err of each step given the least-squares reconstruction so far (ordering='obs':
        its own step costs; other orderings: the same quantity along their order); with reconstruct=False, what
        each removal adds to the error tr(W_P M_PP W_P^T) of the unreconstructed units."""
        removed, costs = self.order(site, config)
        if config.resolved_ordering in ("obs", "heldout") and config.reconstruct:
            return costs
        moment, _ = site.stats.moments(centered=site.bias_available)
        plan = site.plan
        if not config.reconstruct:
            return unreconstructed_errors(moment, site.objective_weight, plan.units(removed, moment.device),
                                          plan.group_size)
        if plan.group_size == 1 and len(plan.pools) == 1:
            return greedy_obs_elimination(moment, site.objective_weight, len(removed), config.damping, removed)[1]
        return greedy_group_elimination(moment, plan, config.damping, site.objective_weight, update_weight=True,
                                        order=removed)[1]

    def decide(self, site: SiteInputs, config: PruneConfig) -> Decision:
        if config.resolved_ordering == "heldout":
            return choose_decision(self, site, config)
        removed, _ = self.order(site, config)
        search = None
        if config.swaps and config.reconstruct:  # local search on the output error (docs/design.md §3.9)
            moment, _ = site.stats.moments(centered=site.bias_available)
            removed, *search = swap_search(moment, site.objective_weight, site.plan, removed, config.swaps,
                                           config.damping)
        decision = site.plan.decision(removed, site.stats.shifted_sum.device)
        if search is not None:
            decision.swaps, decision.swap_errors = search[0], (search[1], search[2])
        self.compensate(site, decision, config)
        return decision

    def compensate(self, site: SiteInputs, decision: Decision, config: PruneConfig) -> None:
        if not config.reconstruct or decision.choice == "variance":  # the mean shift (VBP's) where a bias is
            return super().compensate(site, decision, config)
        least_squares = site.cross is None and len(decision.drop) and len(decision.keep)
        ridge = config.damping
        if decision.ridge is not None:  # chosen with the decision (ordering='heldout')
            ridge = decision.ridge
        elif least_squares and config.resolved_ridge == "heldout":
            # the λ that predicts held-out tokens best (docs/design.md §3.8), before M is built (one n x n less)
            ridge = decision.ridge = choose_ridge(site.stats, site.bias_available, site.objective_weight,
                                                  decision.keep, decision.drop, config.damping)
        moment, mu = site.stats.moments(centered=site.bias_available)
        if site.cross is not None:  # the dense model's consumer output on the kept units (docs/design.md §3.7)
            cross, mu_dense = site.cross.moments(centered=site.bias_available)
            decision.mix = dense_target_map(moment, cross, decision.keep, config.damping)
            if site.bias_available:
                decision.shift = mu_dense - decision.mix @ mu[decision.keep]
        elif least_squares:
            decision.coef = least_squares_map(moment, decision.keep, decision.drop, ridge)
            if site.bias_available:
                decision.shift = mu[decision.drop] - decision.coef @ mu[decision.keep]
        elif len(decision.drop) and site.bias_available:  # nothing kept: the best constant is the mean
            decision.shift = mu[decision.drop]
