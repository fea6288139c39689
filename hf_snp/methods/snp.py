"""SNP: unnormalised-ZCA ordering by greedy elimination and least-squares reconstruction."""

from __future__ import annotations

from ..linalg import greedy_zca_elimination, least_squares_map
from ..stats import SiteStatistics
from .base import Decision, MethodOptions, PruningMethod, register_method, split


@register_method
class SNP(PruningMethod):
    """Subspace Node Pruning (arXiv 2405.17506).

    With a bias available the statistics are centred (affine reconstruction, the bias takes
    mu_P - B mu_K); without one, the raw second moment is used so that the linear
    reconstruction is optimal with no intercept and the architecture stays stock.
    """

    name = "snp"

    def decide(self, stats: SiteStatistics, num_remove: int, bias_available: bool, options: MethodOptions, site_key: int) -> Decision:
        moment, mu = stats.moments(centered=bias_available)
        removed, unique_variance = greedy_zca_elimination(moment, num_remove, options.damping)
        keep, drop = split(stats.n, removed, moment.device)
        if len(drop) == 0:
            return Decision(keep, drop)
        coef = least_squares_map(moment, keep, drop, options.damping)
        shift = mu[drop] - coef @ mu[keep] if bias_available else None
        return Decision(keep, drop, coef, shift, {"removed_order": removed, "unique_variance": unique_variance})
