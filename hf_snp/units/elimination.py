"""Orders of removal beyond the one-at-a-time loops of :mod:`hf_snp.units.linalg`: structured OBS elimination in
batches, with its state on the statistics device (docs/design.md §3.10), and the pivots of a given order (§3.5).

Each batch takes the ``candidates`` units of least OBS error, then removes ``removals`` of them one at a time, each
the least-error candidate given the removals before it (exactly as the one-at-a-time greedy would score it), and
folds the batch into the consumer weight and the precision with one rank-``removals`` update. The greedy's own
choice is known at every step too (every unit's error is kept up to date); a step where it lies outside the
candidates is a *departure*, counted: an order without departures is the one-at-a-time greedy order. Nothing is
read back to the host until the order is complete.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .linalg import robust_cholesky

BATCH_DIVISOR = 32  # a batch removes 1/32 of the units still there ...
MAX_BATCH = 64  # ... at most this many ...
CANDIDATE_FACTOR = 4  # ... chosen among 4 times as many candidates ...
MIN_CANDIDATES = 32  # ... and at least this many (all the units left, when fewer: then the batch is exact)


class ObsOrder(NamedTuple):
    """The removed units in order, the OBS error each removal added, and the steps whose choice the one-at-a-time
    greedy would have made differently (a unit outside the batch's candidates had less error)."""

    removed: list[int]
    errors: list[float]
    departures: int


def obs_batches(num_units: int, num_remove: int) -> list[tuple[int, int]]:
    """(removals, candidates) of each batch. A batch's size depends only on how many units are left, so the first
    steps of a longer order are a shorter order's (the last batch is cut short, its candidates unchanged)."""
    batches, removed = [], 0
    while removed < num_remove:
        left = num_units - removed
        size = max(1, min(MAX_BATCH, left // BATCH_DIVISOR))
        candidates = min(left, max(CANDIDATE_FACTOR * size, MIN_CANDIDATES))
        if candidates == left:  # every unit is a candidate: the steps are the greedy's, however many
            size = left
        batches.append((min(size, num_remove - removed), candidates))
        removed += size
    return batches


def batched_obs_elimination(moment: torch.Tensor, weight: torch.Tensor, num_remove: int, damping: float,
                            batches: list[tuple[int, int]] | None = None) -> ObsOrder:
    """The structured-OBS order of :func:`hf_snp.units.linalg.greedy_obs_elimination` (err_q = ||W_eff[:, q]||^2 /
    Q_qq, Q the precision of the damped moment of the units left), ``num_remove`` steps in ``batches`` (default
    :func:`obs_batches`; ``[(1, 1)] * num_remove`` is the one-at-a-time greedy). The errors add up to the output
    error of the least-squares map on the units kept, whatever the batches."""
    if num_remove <= 0:
        return ObsOrder([], [], 0)
    batches = batches or obs_batches(moment.shape[0], num_remove)
    lefts = [moment.shape[0] - sum(size for size, _ in batches[:i]) for i in range(len(batches))]
    if sum(size for size, _ in batches) != num_remove or any(not 1 <= size <= candidates <= left for
                                                             (size, candidates), left in zip(batches, lefts)):
        raise ValueError(f"batches {batches} must remove {num_remove} units in all, each batch between 1 and its "
                         "candidates, and those at most the units left; or pass batches=None")
    state = _ObsState(moment, weight, damping, max(size for size, _ in batches))
    for removals, candidates in batches:
        state.run_batch(removals, candidates)
    return state.result()


class _ObsState:
    """Q (the precision of the units left), rows = W_eff^T [n, out], each row's energy ||W_eff[:, i]||^2, Q's
    diagonal and the alive mask, all on the statistics device; and the buffers of a batch of up to ``largest``."""

    def __init__(self, moment: torch.Tensor, weight: torch.Tensor, damping: float, largest: int):
        n, out = moment.shape[0], weight.shape[0]
        self.tiny = torch.finfo(moment.dtype).tiny
        factor = robust_cholesky(moment, damping)
        self.precision = torch.eye(n, dtype=moment.dtype, device=moment.device)  # a solve against I, in place:
        torch.cholesky_solve(self.precision, factor, out=self.precision)  # LAPACK's inverse (potri) was slower on CPU
        del factor
        self.rows = weight.to(moment).T.contiguous()
        self.energy = torch.linalg.vector_norm(self.rows, dim=1).square_()
        # a batch writes column j of these before it reads columns < j: allocated once (fresh zeroed pages cost)
        self.buffers = [self.rows.new_empty(n, largest) for _ in range(3)] + [self.rows.new_empty(largest, out)]
        self.diag = self.precision.diagonal().clone()
        self.alive = torch.ones(n, dtype=torch.bool, device=moment.device)
        self.picks: list[torch.Tensor] = []
        self.errors: list[torch.Tensor] = []
        self.departures = torch.zeros((), dtype=moment.dtype, device=moment.device)

    def error(self, energy: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        """err_i of every unit left (+inf for the removed ones)."""
        return torch.where(self.alive, energy / diag.clamp_min(self.tiny), torch.inf)

    def run_batch(self, removals: int, candidates: int) -> None:
        """Remove ``removals`` of the ``candidates`` units of least error, one at a time, then fold them in.

        Within the batch, step j keeps (lazily, as in a left-looking factorisation) A [n, j] with a_i = Q_ip / Q_pp
        of each removed p, U = Q_:p / sqrt(Q_pp) and the removed rows R at their removal, so that W_eff = W_eff0 -
        A R and Q = Q0 - U U^T; a step costs O(n j) besides the candidates' Gram columns, taken once per batch."""
        cand = self.error(self.energy, self.diag).topk(candidates, largest=False).indices
        gram = self.rows @ self.rows[cand].T  # [n, c]: <W_eff0[:, i], W_eff0[:, c]>
        q_cand = self.precision[cand].T  # Q is symmetric: its rows are read contiguously
        fold, factor, base, removed_rows = self.buffers
        batch = _Batch(fold[:, :removals], factor[:, :removals], base[:, :removals], removed_rows[:removals],
                       torch.ones(candidates, dtype=torch.bool, device=cand.device),
                       self.energy.clone(), self.diag.clone())
        for step in range(removals):
            self.remove_one(step, cand, gram, q_cand, batch)
        self.rows.addmm_(batch.fold, batch.removed_rows, alpha=-1)  # W_eff0 - A R
        self.precision.addmm_(batch.factor, batch.factor.T, alpha=-1)  # Q0 - U U^T
        self.energy = torch.linalg.vector_norm(self.rows, dim=1).square_()
        self.diag = self.precision.diagonal().clone()

    def remove_one(self, step: int, cand: torch.Tensor, gram: torch.Tensor, q_cand: torch.Tensor,
                   batch: "_Batch") -> None:
        """One greedy step within the batch: the candidate of least error goes; every unit's energy and Q_ii follow."""
        errors = self.error(batch.energy, batch.diag)
        cand_errors = torch.where(batch.open, errors[cand], torch.inf)
        slot = cand_errors.argmin(0, keepdim=True)  # [1]: stays on the device
        p, best = cand[slot], cand_errors[slot]
        self.departures += (errors.min() < best.squeeze(0)).to(self.departures.dtype)
        a_p = batch.fold[p, :step]  # [1, j]
        removed_row = self.rows[p] - a_p @ batch.removed_rows[:step]  # W_eff[:, p] now
        base = gram[:, slot] - batch.base[:, :step] @ a_p.T  # W_eff0^T W_eff[:, p]
        inner = base - batch.fold[:, :step] @ (batch.removed_rows[:step] @ removed_row.T)  # W_eff^T W_eff[:, p]
        column = q_cand[:, slot] - batch.factor[:, :step] @ batch.factor[p, :step].T  # Q_:p now
        pivot = column[p].clamp_min(self.tiny)
        fold = column / pivot
        batch.energy.add_((fold * (fold * inner[p] - 2 * inner)).squeeze(1))  # ||W_eff[:, i] - a_i W_eff[:, p]||^2
        batch.diag.sub_((column * fold).squeeze(1))  # Q_ii - Q_ip^2 / Q_pp
        batch.fold[:, step:step + 1] = fold
        batch.factor[:, step:step + 1] = column / pivot.sqrt()
        batch.base[:, step:step + 1] = base
        batch.removed_rows[step:step + 1] = removed_row
        self.alive[p] = False
        batch.open[slot] = False
        self.picks.append(p)
        self.errors.append(best)

    def result(self) -> ObsOrder:
        """The order, read back to the host once."""
        picks = torch.cat(self.picks).to(self.departures.dtype)
        packed = torch.cat([picks, torch.cat(self.errors), self.departures[None]]).tolist()
        count = len(self.picks)
        return ObsOrder([int(p) for p in packed[:count]], packed[count:2 * count], int(packed[-1]))


class _Batch:
    """The lazily applied state of one batch (see :meth:`_ObsState.run_batch`)."""

    def __init__(self, fold: torch.Tensor, factor: torch.Tensor, base: torch.Tensor, removed_rows: torch.Tensor,
                 open_slots: torch.Tensor, energy: torch.Tensor, diag: torch.Tensor):
        self.fold, self.factor, self.base, self.removed_rows, self.open = fold, factor, base, removed_rows, open_slots
        self.energy, self.diag = energy, diag  # every unit's ||W_eff[:, i]||^2 and Q_ii after the steps so far


def ordered_pivot_costs(moment: torch.Tensor, keep_first: list[int], group_size: int, damping: float) -> list[float]:
    """Per group, in a given keep-first order: the trace of its covariance given the groups before it.

    That is the squared Frobenius norm of the group's diagonal block of the Cholesky factor of
    M permuted to that order (the block-LDL pivot). Used for orders that are not greedy.
    """
    units = torch.cat([torch.arange(g * group_size, (g + 1) * group_size) for g in keep_first]).to(moment.device)
    factor = robust_cholesky(moment[units][:, units], damping)
    blocks = factor.diagonal().pow(2).view(len(keep_first), group_size)
    if group_size > 1:
        full = torch.stack([factor[i * group_size:(i + 1) * group_size,
                                   i * group_size:(i + 1) * group_size].pow(2).sum()
                            for i in range(len(keep_first))])
        return full.tolist()
    return blocks.sum(1).tolist()
