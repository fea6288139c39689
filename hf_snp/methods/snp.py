"""SNP: unnormalised-ZCA ordering by greedy elimination and least-squares reconstruction."""

from __future__ import annotations

from ..linalg import greedy_group_elimination, greedy_zca_elimination, least_squares_map
from ..stats import SiteStatistics
from .base import Decision, MethodOptions, PruningMethod, RemovalPlan, register_method


@register_method
class SNP(PruningMethod):
    """Subspace Node Pruning (arXiv 2405.17506).

    With a bias available the statistics are centred (affine reconstruction, the bias takes
    mu_P - B mu_K); without one, the raw second moment is used so that the linear
    reconstruction is optimal with no intercept and the architecture stays stock.
    """

    name = "snp"

    def decide(self, stats: SiteStatistics, plan: RemovalPlan, bias_available: bool, options: MethodOptions, site_key: int) -> Decision:
        moment, mu = stats.moments(centered=bias_available)
        if plan.group_size == 1 and len(plan.pools) == 1:
            removed, unique_variance = greedy_zca_elimination(moment, plan.rounds, options.damping)
        else:
            removed, unique_variance = greedy_group_elimination(moment, plan, options.damping)
        decision = plan.decision(removed, moment.device, info={"unique_variance": unique_variance})
        if len(decision.drop) and len(decision.keep):
            decision.coef = least_squares_map(moment, decision.keep, decision.drop, options.damping)
            decision.shift = mu[decision.drop] - decision.coef @ mu[decision.keep] if bias_available else None
        elif len(decision.drop) and bias_available:  # nothing kept: the best constant is the mean
            decision.shift = mu[decision.drop]
        return decision
