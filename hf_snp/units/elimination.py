"""Orders of removal beyond the one-at-a-time loops of :mod:`hf_snp.units.linalg`: structured OBS elimination in
batches, with its state on the statistics device (docs/design.md §3.10), and the pivots of a given order (§3.5).

Each batch takes the ``candidates`` units of least OBS error, then removes ``removals`` of them one at a time, each
the least-error candidate given the removals before it (exactly as the one-at-a-time greedy would score it), working
on the candidates alone, and folds the batch into the consumer weight and the precision with one rank-``removals``
update. Every unit's error before each step is then known, so a step where the greedy's own choice lay outside the
candidates is a *departure*, counted: an order without departures is the one-at-a-time greedy order. Nothing is read
back to the host until the order is complete (but for the one read that picks float32, below).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .linalg import damped, robust_cholesky

BATCH_DIVISOR = 32  # a batch removes 1/32 of the units still there ...
MAX_BATCH = 64  # ... at most this many ...
CANDIDATE_FACTOR = 4  # ... chosen among 4 times as many candidates ...
MIN_CANDIDATES = 128  # ... and at least this many (all the units left, when fewer: then the batch is exact) ...
MIN_BATCH = MIN_CANDIDATES // CANDIDATE_FACTOR  # ... so at least 32 go at a time while more are left
# with ``single=True`` a float64 moment is ordered in float32 when its damped float32 Cholesky factors and its pivots
# L_ii^2 span less than this (a lower bound of the condition number; docs/design.md §3.10: SmolLM2's MLP sites under
# 1e4 took the same units in float32 as in float64, and so did those above, up to 1e7)
SINGLE_PIVOT_SPAN = 1e4


class ObsOrder(NamedTuple):
    """The removed units in order, the OBS error each removal added, and the steps whose choice the one-at-a-time
    greedy would have made differently (a unit outside the batch's candidates had less error)."""

    removed: list[int]
    errors: list[float]
    departures: int
    single: bool = False  # ordered in float32


def obs_batches(num_units: int, num_remove: int) -> list[tuple[int, int]]:
    """(removals, candidates) of each batch. A batch's size depends only on how many units are left, so the first
    steps of a longer order are a shorter order's (the last batch is cut short, its candidates unchanged)."""
    batches, removed = [], 0
    while removed < num_remove:
        left = num_units - removed
        size = max(MIN_BATCH, min(MAX_BATCH, left // BATCH_DIVISOR))
        candidates = min(left, max(CANDIDATE_FACTOR * size, MIN_CANDIDATES))
        if candidates == left:  # every unit is a candidate: the steps are the greedy's, however many
            size = left
        batches.append((min(size, num_remove - removed), candidates))
        removed += size
    return batches


def batched_obs_elimination(moment: torch.Tensor, weight: torch.Tensor, num_remove: int, damping: float,
                            batches: list[tuple[int, int]] | None = None, single: bool = False) -> ObsOrder:
    """The structured-OBS order of :func:`hf_snp.units.linalg.greedy_obs_elimination` (err_q = ||W_eff[:, q]||^2 /
    Q_qq, Q the precision of the damped moment of the units left), ``num_remove`` steps in ``batches`` (default
    :func:`obs_batches`; ``[(1, 1)] * num_remove`` is the one-at-a-time greedy). The errors add up to the output
    error of the least-squares map on the units kept, whatever the batches. ``single``: in float32 where the moment
    is well conditioned (``SINGLE_PIVOT_SPAN``), at half the cost."""
    if num_remove <= 0:
        return ObsOrder([], [], 0)
    batches = batches or obs_batches(moment.shape[0], num_remove)
    lefts = [moment.shape[0] - sum(size for size, _ in batches[:i]) for i in range(len(batches))]
    if sum(size for size, _ in batches) != num_remove or any(not 1 <= size <= candidates <= left for
                                                             (size, candidates), left in zip(batches, lefts)):
        raise ValueError(f"batches {batches} must remove {num_remove} units in all, each batch between 1 and its "
                         "candidates, and those at most the units left; or pass batches=None")
    state = _ObsState(moment, weight, damping, single)
    for removals, candidates in batches:
        state.run_batch(removals, candidates)
    return state.result()


class _ObsState:
    """Q (the precision of the units left), rows = W_eff^T [n, out], each row's energy ||W_eff[:, i]||^2, Q's
    diagonal and the alive mask, all on the statistics device."""

    def __init__(self, moment: torch.Tensor, weight: torch.Tensor, damping: float, single: bool):
        factor = None
        if single and moment.dtype == torch.float64:
            reduced = moment.float()
            factor, info = torch.linalg.cholesky_ex(damped(reduced, damping))
            pivots = factor.diagonal().square()
            if bool((info == 0) & (pivots.max() < SINGLE_PIVOT_SPAN * pivots.min())):  # one read
                moment = reduced
            else:
                factor = None
        self.single = factor is not None
        if factor is None:
            factor = robust_cholesky(moment, damping)
        self.tiny = torch.finfo(moment.dtype).tiny
        self.precision = torch.cholesky_inverse(factor)
        self.rows = weight.to(moment).T.contiguous()
        self.energy = torch.linalg.vector_norm(self.rows, dim=1).square_()
        self.diag = self.precision.diagonal().clone()
        self.alive = torch.ones(moment.shape[0], dtype=torch.bool, device=moment.device)
        self.picks: list[torch.Tensor] = []
        self.errors: list[torch.Tensor] = []
        self.departures = torch.zeros((), dtype=moment.dtype, device=moment.device)

    def error(self, energy: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        """err_i of every unit left (+inf for the removed ones)."""
        return torch.where(self.alive, energy / diag.clamp_min(self.tiny), torch.inf)

    def run_batch(self, removals: int, candidates: int) -> None:
        """Remove ``removals`` of the ``candidates`` units of least error, one at a time, then fold them in.

        The steps run on the candidates alone: their precision block Q_CC and Gram W_eff[:, C]^T W_eff[:, C], each
        removal p a rank-one update of both (Q <- Q - Q_:p Q_p: / Q_pp, W_eff <- W_eff - W_eff[:, p] Q_p: / Q_pp),
        O(c^2) a step. The batch's removed set R then updates every unit at once (:meth:`fold_in`)."""
        errors = self.error(self.energy, self.diag)
        cand = errors.topk(candidates, largest=False).indices
        rows = self.rows[cand]
        gram = rows @ rows.T  # [c, c]
        block = self.precision[cand][:, cand]  # Q_CC
        open_slots = torch.ones(candidates, dtype=torch.bool, device=cand.device)
        slots, picked_errors = [], []
        for _ in range(removals):
            cand_errors = torch.where(open_slots, gram.diagonal() / block.diagonal().clamp_min(self.tiny), torch.inf)
            slot = cand_errors.argmin(0, keepdim=True)  # [1]: stays on the device
            open_slots[slot] = False
            column, inner = block[:, slot].clone(), gram[:, slot].clone()  # Q_:p, W_eff^T W_eff[:, p] (candidates)
            fold = column / column[slot].clamp_min(self.tiny)  # a = Q_:p / Q_pp
            half = inner - fold * (inner[slot] / 2)  # so that the Gram loses a h^T + h a^T
            block.addmm_(fold, column.T, alpha=-1)
            gram.addmm_(fold, half.T, alpha=-1).addmm_(half, fold.T, alpha=-1)
            slots.append(slot)
            picked_errors.append(cand_errors[slot])
        picked, picked_errors = cand[torch.cat(slots)], torch.cat(picked_errors)
        outside = self.alive.clone()
        outside[cand] = False
        self.fold_in(picked, picked_errors, outside)
        self.picks.append(picked)
        self.errors.append(picked_errors)

    def fold_in(self, picked: torch.Tensor, picked_errors: torch.Tensor, outside: torch.Tensor) -> None:
        """Remove the batch ``picked`` (in its order) from every unit: with L L^T = Q_RR, U = Q_:R L^-T and
        S = L^-1 W_eff[:, R]^T, W_eff^T <- W_eff^T - U S and Q <- Q - U U^T (the k one-at-a-time updates in one).
        Counts the departures: steps where a unit ``outside`` the candidates had less error than the one taken."""
        factor = torch.linalg.cholesky_ex(self.precision[picked][:, picked])[0]
        spread = torch.linalg.solve_triangular(factor, self.precision[picked], upper=False).T  # U [n, k]
        removed = torch.linalg.solve_triangular(factor, self.rows[picked], upper=False)  # S [k, out]
        self.departures += self._departures(spread, removed, picked_errors, outside)
        self.rows.addmm_(spread, removed, alpha=-1)
        self.precision.addmm_(spread, spread.T, alpha=-1)
        self.alive[picked] = False
        self.energy = torch.linalg.vector_norm(self.rows, dim=1).square_()
        self.diag = self.precision.diagonal().clone()

    def _departures(self, spread: torch.Tensor, removed: torch.Tensor, picked_errors: torch.Tensor,
                    outside: torch.Tensor) -> torch.Tensor:
        """How many steps of the batch a unit ``outside`` the candidates had less error than the step's choice.
        Before step j, unit i has Q_ii - sum_(m<j) U_im^2 and ||W_eff[:, i] - sum_(m<j) U_im S_m||^2 (expanded with
        C = W_eff^T S^T and G = S S^T), for every j at once."""
        cross, gram = self.rows @ removed.T, removed @ removed.T  # C [n, k], G [k, k]
        added = spread * (spread @ torch.triu(gram, 1) * 2 - cross * 2 + spread * gram.diagonal())
        energy = self.energy[:, None] + _before_each(added)
        diag = self.diag[:, None] - _before_each(spread.square())
        errors = torch.where(outside[:, None], energy / diag.clamp_min(self.tiny), torch.inf)
        return (errors.amin(0) < picked_errors).sum().to(self.departures.dtype)

    def result(self) -> ObsOrder:
        """The order, read back to the host once."""
        picks = torch.cat(self.picks).to(self.departures.dtype)
        errors = torch.cat(self.errors)
        packed = torch.cat([picks, errors, self.departures[None]]).tolist()
        count = picks.numel()
        return ObsOrder([int(p) for p in packed[:count]], packed[count:2 * count], int(packed[-1]), self.single)


def _before_each(steps: torch.Tensor) -> torch.Tensor:
    """[n, k] -> [n, k]: column j the sum of the columns before j (0 for the first)."""
    total = steps.cumsum(1)
    return torch.cat([torch.zeros_like(total[:, :1]), total[:, :-1]], dim=1)


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
