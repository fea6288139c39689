"""Statistics summed over the ranks of a distributed run (docs/design.md §8.7).

Each rank accumulates its own calibration batches around its own shift (its first batch's mean). Before any
decision, every rank's sums are moved to one common shift, exactly, in float64, and added up: the result is the
statistics of all the batches, whichever rank ran which. With one process nothing happens.
"""

from __future__ import annotations

import torch

from .. import parallel
from .expert_layer import ExpertEnergy
from .stats import CrossMoments, SiteStatistics


def all_reduce(stats: SiteStatistics | ExpertEnergy) -> SiteStatistics | ExpertEnergy:
    """Sum one site's statistics over the ranks, in place, whatever their kind."""
    if isinstance(stats, ExpertEnergy):
        if parallel.world_size() > 1:
            parallel.all_reduce_sum(stats.energy)
            parallel.all_reduce_sum(stats.tokens)
        return stats
    return all_reduce_statistics(stats)


def _common(shift: torch.Tensor | None) -> torch.Tensor | None:
    """The first rank's shift that exists (a rank may have seen no token), on this rank's device."""
    shifts = parallel.all_gather_objects(None if shift is None else shift.detach().cpu())
    found = next((s for s in shifts if s is not None), None)
    return None if found is None else found.to(torch.float64)


def _rebased(total: torch.Tensor, count: int | torch.Tensor, old: torch.Tensor | None,
             new: torch.Tensor) -> torch.Tensor:
    """A sum of (h - old) over ``count`` tokens (or of w (h - old), ``count`` their total weight) as the sum of
    (h - new), in float64."""
    total = total.to(torch.float64)
    return total if old is None else total + count * (old.to(total) - new.to(total.device))


def all_reduce_statistics(stats: SiteStatistics) -> SiteStatistics:
    """Sum ``stats`` over the ranks, in place; afterwards every rank holds the statistics of all batches."""
    if parallel.world_size() == 1:
        return stats
    common = _common(stats.shift)
    if common is None:
        return stats
    counts = torch.tensor(stats.fold_counts, dtype=torch.float64, device=stats.fold_sums[0].device)
    for fold in range(stats.folds):
        mass, total = stats.fold_mass(fold), stats.fold_sums[fold]  # weighted: the sums are of w (h - shift)
        gram = stats.fold_grams[fold].to(torch.float64)
        if stats.shift is not None and stats.fold_counts[fold]:
            delta = stats.shift.to(gram) - common.to(gram.device)  # h - common = (h - shift) + delta
            gram.addr_(total.to(gram), delta).addr_(delta, total.to(gram)).addr_(delta * mass, delta)
        stats.fold_sums[fold] = parallel.all_reduce_sum(_rebased(total, mass, stats.shift, common))
        stats.fold_grams[fold] = parallel.all_reduce_sum(gram)
        if stats.weighted:
            stats.fold_weights[fold] = parallel.all_reduce_sum(stats.fold_weights[fold].clone())
    stats.fold_counts = [int(c) for c in parallel.all_reduce_sum(counts).tolist()]
    if stats.post_norm is not None:  # plain sums over tokens: no shift
        stats.post_norm.cross = parallel.all_reduce_sum(stats.post_norm.cross)
        stats.post_norm.energy = parallel.all_reduce_sum(stats.post_norm.energy)
    stats.shift = common.to(stats.fold_sums[0].device)
    return stats


def all_reduce_cross(cross: CrossMoments) -> CrossMoments:
    """Sum dense-target cross moments over the ranks, in place (the same rebasing for both streams)."""
    if parallel.world_size() == 1:
        return cross
    shifts = parallel.all_gather_objects(None if cross.shifts is None else tuple(s.cpu() for s in cross.shifts))
    common = next((s for s in shifts if s is not None), None)
    if common is None:
        return cross
    device = cross.cross.device
    dense_new, pruned_new = (s.to(device, torch.float64) for s in common)
    matrix = cross.cross.to(torch.float64)
    if cross.shifts is not None and cross.count:
        d_dense = cross.shifts[0].to(matrix) - dense_new
        d_pruned = cross.shifts[1].to(matrix) - pruned_new
        sum_dense, sum_pruned = cross.sum_dense.to(matrix), cross.sum_pruned.to(matrix)
        matrix.addr_(sum_dense, d_pruned).addr_(d_dense, sum_pruned).addr_(d_dense, d_pruned, alpha=cross.count)
    old = (None, None) if cross.shifts is None else cross.shifts
    cross.sum_dense = parallel.all_reduce_sum(_rebased(cross.sum_dense, cross.count, old[0], dense_new))
    cross.sum_pruned = parallel.all_reduce_sum(_rebased(cross.sum_pruned, cross.count, old[1], pruned_new))
    cross.cross = parallel.all_reduce_sum(matrix)
    cross.count = int(parallel.all_reduce_sum(torch.tensor(float(cross.count), dtype=torch.float64)).item())
    cross.shifts = (dense_new, pruned_new)
    return cross
