"""The linear algebra of SNP: damping, greedy ZCA and OBS elimination, least-squares reconstruction
(docs/design.md §2.3, §3)."""

from __future__ import annotations

import torch


def damped(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    """matrix + damping * mean(diag) * I (a floor keeps an all-zero matrix invertible)."""
    scale = matrix.diagonal().mean().clamp_min(torch.finfo(matrix.dtype).tiny)
    out = matrix.clone()
    out.diagonal().add_(damping * scale)
    return out


def robust_cholesky(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    """Cholesky factor of the damped matrix, raising the damping tenfold until it factors."""
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(damped(matrix, damping))
        if int(info) == 0:
            return factor
        damping = max(damping * 10, 1e-10)
    raise torch.linalg.LinAlgError("matrix is not positive definite even with heavy damping")


def read_order(picks: list[torch.Tensor], costs: list[torch.Tensor]) -> tuple[list[int], list[float]]:
    """The removed indices and their costs ([1]-tensors an elimination kept on its device), read back at once."""
    if not picks:
        return [], []
    packed = torch.cat([torch.cat(picks).to(costs[0].dtype), torch.cat(costs)]).tolist()
    return [int(p) for p in packed[:len(picks)]], packed[len(picks):]


def greedy_zca_elimination(moment: torch.Tensor, num_remove: int, damping: float,
                           weights: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
    """Remove units one at a time, always the one with the least unique variance.

    The unique variance of unit i among the remaining set S is r_i = 1 / [M_SS^{-1}]_ii (the
    unnormalised-ZCA score). After removing p, M_S'S'^{-1} is the Schur complement of the
    precision matrix: a rank-one downdate. Doing it left-looking (a pivoted Cholesky of the
    precision with largest-diagonal pivots) costs O(n * step) per step.

    Returns the removed units in removal order and their r at removal, which is the LDL
    pivot D_jj of that unit in the reversed (keep-first) order. With ``weights`` w (the energy
    ||W_:,i||^2 of what each unit feeds) the unit with the least w_i r_i goes first and that
    product (the output error its removal leaves) is returned instead: the output-aware order.
    """
    n = moment.shape[0]
    if num_remove <= 0:
        return [], []
    factor = robust_cholesky(moment, damping)
    precision = torch.cholesky_inverse(factor)
    # LAPACK factors all n columns (n^3/3 flops, blocked); the loop reads n * step numbers per step
    # (memory-bound). On 2 CPU cores the loop only wins for short prefixes of narrow sites
    # (30% of 1536 or 2048 units); from 4096 units LAPACK wins (benchmarks/cost.py, width).
    if (weights is None and (num_remove > 0.6 * n or n >= 4096) and precision.device.type == "cpu"
            and precision.dtype == torch.float64):
        found = _lapack_pivoted_cholesky(precision, num_remove)
        if found is not None:
            return found
    cols = precision.new_zeros(n, num_remove)
    diag = precision.diagonal().clone()
    alive = torch.ones(n, dtype=torch.bool, device=moment.device)
    picks, unique_variance = [], []  # kept on the device: one read at the end (docs/design.md §3.10)
    scale = None if weights is None else weights.to(moment).clamp_min(torch.finfo(moment.dtype).tiny)
    for step in range(num_remove):
        priority = diag if scale is None else diag / scale
        p = torch.where(alive, priority, -torch.inf).argmax(0, keepdim=True)
        pivot = diag[p].clamp_min(torch.finfo(diag.dtype).tiny)
        col = precision[:, p].squeeze(1) - cols[:, :step] @ cols[p, :step].squeeze(0)
        cols[:, step] = col / pivot.sqrt()
        diag -= cols[:, step] ** 2
        alive[p] = False
        picks.append(p)
        unique_variance.append((1.0 if scale is None else scale[p]) / pivot)
    return read_order(picks, unique_variance)


def greedy_obs_elimination(moment: torch.Tensor, weight: torch.Tensor, num_remove: int, damping: float,
                           order: list[int] | None = None) -> tuple[list[int], list[float]]:
    """Structured OBS (ZipLM, OSSCAR; docs/design.md §3.5): remove, one at a time, the unit q whose removal adds
    the least consumer-output error given the reconstruction so far, err_q = ||W_eff[:, q]||^2 / [Q]_qq.

    W_eff starts as the consumer weight W [out, n]; removing q sets W_eff <- W_eff - W_eff[:, q] Q_q: / Q_qq (the
    least-squares fold of q into the remaining columns) and downdates Q like :func:`greedy_zca_elimination`
    (left-looking, O(n * step)); the W_eff update and the column energies cost O(n * out) per step. Returns
    the removed units and their err_q, which add up to the output error of the least-squares map on the rest.
    With ``order`` the units are removed in that order instead (its first ``num_remove``): the err_q of each.
    """
    n = moment.shape[0]
    if num_remove <= 0:
        return [], []
    precision = torch.cholesky_inverse(robust_cholesky(moment, damping))
    rows = weight.to(moment).T.contiguous()  # [n, out]: row i is W_eff[:, i]
    tiny = torch.finfo(moment.dtype).tiny
    cols = precision.new_zeros(n, num_remove)
    diag = precision.diagonal().clone()
    alive = torch.ones(n, dtype=torch.bool, device=moment.device)
    given = None if order is None else torch.as_tensor(order[:num_remove], device=moment.device)
    picks, errors = [], []  # kept on the device: one read at the end (docs/design.md §3.10)
    for step in range(num_remove):
        error = torch.linalg.vector_norm(rows, dim=1).pow(2) / diag.clamp_min(tiny)
        p = torch.where(alive, error, torch.inf).argmin(0, keepdim=True) if given is None else given[step:step + 1]
        pivot = diag[p].clamp_min(tiny)
        col = precision[:, p].squeeze(1) - cols[:, :step] @ cols[p, :step].squeeze(0)  # the current Q_:p
        rows.addr_(col, rows[p].squeeze(0) / pivot, alpha=-1)  # W_eff <- W_eff - W_eff[:, p] Q_p: / Q_pp
        cols[:, step] = col / pivot.sqrt()
        diag -= cols[:, step] ** 2
        alive[p] = False
        picks.append(p)
        errors.append(error[p])
    return read_order(picks, errors)


def unreconstructed_errors(moment: torch.Tensor, weight: torch.Tensor, units: torch.Tensor,
                           group_size: int) -> list[float]:
    """The consumer-output error each removal adds with nothing reconstructed: removing ``units`` (groups of
    ``group_size`` in removal order) leaves E||W_P h_P||^2 = tr(W_P M_PP W_P^T), the sum of G = (W^T W) * M over
    P x P, so unit u adds G_uu + 2 sum_(j before u) G_uj. One entry per group."""
    w = weight.to(moment)[:, units]
    gram = (w.T @ w) * moment[units][:, units]
    added = gram.diagonal() + 2 * gram.tril(-1).sum(1)
    return added.view(-1, group_size).sum(1).tolist()


def _lapack_pivoted_cholesky(precision: torch.Tensor, num_remove: int) -> tuple[list[int], list[float]] | None:
    """The same elimination by LAPACK's blocked pivoted Cholesky (``dpstrf``: largest remaining
    diagonal first), several times faster than the column loop on CPU. None when it stops early
    (numerically singular precision), where the loop's floors take over."""
    from scipy.linalg import lapack

    factor, pivots, rank, info = lapack.dpstrf(precision.numpy(), tol=-1.0, lower=1)
    if info < 0 or rank < num_remove:
        return None
    diagonal = factor.diagonal()[:num_remove]  # host arrays (this path is CPU-only): no device read
    return [int(p) - 1 for p in pivots[:num_remove]], [float(v) for v in 1.0 / (diagonal * diagonal)]


def least_squares_map(moment: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor, damping: float) -> torch.Tensor:
    """B = M_PK (M_KK + lambda I)^{-1}: the best linear prediction of removed units from kept ones."""
    factor = robust_cholesky(moment[keep][:, keep], damping)
    return torch.cholesky_solve(moment[keep][:, drop], factor).T


def dense_target_map(moment: torch.Tensor, cross: torch.Tensor, keep: torch.Tensor, damping: float) -> torch.Tensor:
    """The [N, K] mix with W'_K = W mix, the least-squares fit of the dense consumer output W h^d on the pruned
    model's kept units (docs/design.md §3.7): mix = I_:K + (C_:K - I_:K M_KK) (M_KK + lambda I)^{-1}, ``moment`` M
    of the pruned units, ``cross`` C = E[h^d h~^T]. The damping pulls W'_K towards W_K, so C = M gives §3.6's map."""
    n, k = cross.shape[0], len(keep)
    if k == 0:
        return cross.new_zeros(n, 0)
    kept = moment[keep][:, keep]
    residual = cross[:, keep].clone()
    residual[keep] -= kept
    mix = torch.cholesky_solve(residual.T, robust_cholesky(kept, damping)).T
    mix[keep, torch.arange(k, device=mix.device)] += 1
    return mix


def spd_inverse(blocks: torch.Tensor) -> torch.Tensor:
    """Inverses of a batch of symmetric positive definite blocks by Cholesky (no pivoting). Batched LU
    inversion (``torch.linalg.inv``) was seen to fail intermittently on CPU in MKL (invalid pivots from DLASWP)
    on SmolLM2's 192-unit KV-group blocks; a block that is not numerically positive definite falls back to LU."""
    factor, info = torch.linalg.cholesky_ex(blocks)
    if bool((info > 0).any()):
        return torch.linalg.inv(blocks)
    return torch.cholesky_inverse(factor)


def spd_inverse_on_device(blocks: torch.Tensor) -> torch.Tensor:
    """:func:`spd_inverse` with no read back to the host: a block whose Cholesky factorisation fails (rounding in a
    near-singular precision) is factored again with a ridge of 1e-10, then 1e-6, of its mean diagonal."""
    factor, info = torch.linalg.cholesky_ex(blocks)
    scale = blocks.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(torch.finfo(blocks.dtype).tiny)
    for ridge in (1e-10, 1e-6):
        extra = torch.where(info > 0, ridge * scale, 0.0)[..., None]
        factor, info = torch.linalg.cholesky_ex(blocks + torch.diag_embed(extra.expand(blocks.shape[:-1])))
    return torch.cholesky_inverse(factor)


def greedy_group_elimination(moment: torch.Tensor, plan, damping: float, weight: torch.Tensor | None = None,
                             update_weight: bool = False, order: list[int] | None = None
                             ) -> tuple[list[int], list[float]]:
    """Group version of the greedy elimination, following ``plan.schedule``.

    At each step, among the step's candidate groups, remove the group g with the least
    unique variance r_g = tr(([Q]_gg)^{-1}) (Q the precision of the remaining units), then
    downdate Q by the Schur complement of that block (rank group_size). Returns the
    removed groups in order and their r_g, the conditional variance each kept last. With the
    consumer ``weight`` W the score is the output error tr(W_g ([Q]_gg)^{-1} W_g^T) instead.
    With ``update_weight`` (structured OBS, docs/design.md §3.5) W is the reconstruction so far, W_eff: after
    removing g, W_eff <- W_eff - W_eff[:, g] ([Q]_gg)^{-1} Q_g:. With ``order`` (one group per step of the
    schedule) the groups are removed in that order instead: the score of each at its removal.
    """
    precision = torch.cholesky_inverse(robust_cholesky(moment, damping))
    weight = None if weight is None else weight.to(moment)
    device, size = moment.device, plan.group_size
    pools = [torch.as_tensor(pool, device=device) for pool in plan.pools]
    given = None if order is None else torch.as_tensor(order, device=device)
    alive = torch.ones(plan.num_groups, dtype=torch.bool, device=device)
    picks, unique_variance = [], []  # kept on the device: one read at the end (docs/design.md §3.10)
    for step in range(len(plan.schedule)):  # the schedule: every pool in turn, ``rounds`` times
        candidates = pools[step % len(pools)] if given is None else given[step:step + 1]
        idx = candidates[:, None] * size + torch.arange(size, device=device)  # [candidates, group]
        live = alive[candidates]  # a removed group's block is replaced by I, and its score by +inf
        blocks = torch.where(live[:, None, None], precision[idx[:, :, None], idx[:, None, :]],
                             torch.eye(size, dtype=moment.dtype, device=device))
        blocks = spd_inverse_on_device(blocks)
        if weight is None:
            scores = blocks.diagonal(dim1=-2, dim2=-1).sum(-1)
        else:
            w = weight[:, idx].permute(1, 0, 2)  # [candidates, out, group]
            scores = torch.einsum("com,cmn,con->c", w, blocks, w)
        best = torch.where(live, scores, torch.inf).argmin(0, keepdim=True)
        units = idx[best].squeeze(0)
        cross = precision[:, units]
        solved = torch.linalg.solve_ex(precision[units][:, units], cross.T)[0]  # ([Q]_gg)^{-1} Q_g:, no check
        if update_weight:
            weight = weight - weight[:, units] @ solved
        precision = precision - cross @ solved
        alive[candidates[best]] = False
        picks.append(candidates[best])
        unique_variance.append(scores[best])
    return read_order(picks, unique_variance)


def least_squares_error(moment: torch.Tensor, weight: torch.Tensor, drop: torch.Tensor, damping: float) -> float:
    """E(P) = tr(W_P (M~_PP - M~_PK M~_KK^{-1} M~_KP) W_P^T), M~ = damped(M): the consumer-output error left by
    removing the units ``drop`` and reconstructing them from the rest by least squares (docs/design.md §3.9)."""
    n = moment.shape[0]
    mask = torch.ones(n, dtype=torch.bool, device=moment.device)
    mask[drop] = False
    keep, drop = mask.nonzero().flatten(), (~mask).nonzero().flatten()
    return _SweptSite(damped(moment, damping), weight.to(moment), keep, drop).error


class _SweptSite:
    """The state of the swap search (docs/design.md §3.9): M~ swept on the kept set K,

        S = [[-M~_KK^{-1}, M~_KK^{-1} M~_KP], [M~_PK M~_KK^{-1}, M~_PP - M~_PK M~_KK^{-1} M~_KP]]   (n x n, symmetric)

    (S_PK is the least-squares map B, S_PP the Schur complement, -S_KK the kept units' precision), the Gram
    Gamma = T^T T of T = W S restricted as [W_P S_PP, W_K + W_P S_PK] (the removed units' error directions and the
    reconstructed consumer columns), and E = tr(W_P S_PP W_P^T). Sweeping a group into K or back out of it is a
    rank-|g| update of S and Gamma: O(n^2 |g|)."""

    def __init__(self, matrix: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor):
        n = matrix.shape[0]
        swept = torch.empty_like(matrix)
        if len(keep):
            # a solve against I: torch.cholesky_inverse was several times slower on CPU (1000-2000 units)
            eye = torch.eye(len(keep), dtype=matrix.dtype, device=matrix.device)
            kept_inverse = torch.cholesky_solve(eye, robust_cholesky(matrix[keep][:, keep], 0.0))
            kept_inverse = (kept_inverse + kept_inverse.T) / 2
            coef = kept_inverse @ matrix[keep][:, drop]  # M~_KK^{-1} M~_KP
            swept[keep[:, None], keep[None, :]] = -kept_inverse
            swept[keep[:, None], drop[None, :]] = coef
            swept[drop[:, None], keep[None, :]] = coef.T
            swept[drop[:, None], drop[None, :]] = matrix[drop][:, drop] - matrix[drop][:, keep] @ coef
        else:
            swept = matrix.clone()
        directions = torch.empty(weight.shape[0], n, dtype=matrix.dtype, device=matrix.device)
        w_drop = weight[:, drop]
        directions[:, drop] = w_drop @ swept[drop][:, drop]
        directions[:, keep] = weight[:, keep] + w_drop @ swept[drop][:, keep]
        self.swept, self.gram = swept, directions.T @ directions
        self.error = float((directions[:, drop] * w_drop).sum())

    def sweep(self, units: torch.Tensor, into_kept: bool) -> None:
        """Move ``units`` into the kept set (a forward sweep: un-remove them) or out of it (a reverse sweep)."""
        s, gram = self.swept, self.gram
        pivot_inverse = torch.linalg.inv(s[units][:, units])
        gram_block = gram[units][:, units]
        self.error -= float((pivot_inverse * gram_block).sum())  # tr(D^-1 Gamma_gg), D symmetric
        sign = 1.0 if into_kept else -1.0
        cols = s[:, units] @ pivot_inverse  # S_:g D^-1
        update = cols.T.clone()  # U: T <- T - T_g U
        update[:, units] = torch.eye(len(units), dtype=s.dtype, device=s.device) - sign * pivot_inverse
        s.addmm_(cols, s[units, :], alpha=-1)
        s[:, units] = sign * cols
        s[units, :] = sign * cols.T
        s[units[:, None], units[None, :]] = -pivot_inverse
        gram_cols = gram[:, units].clone()  # Gamma' = Gamma - Gamma_:g U - U^T Gamma_g: + U^T Gamma_gg U
        gram.addmm_(gram_cols, update, alpha=-1)
        gram.addmm_(update.T, gram_cols.T - gram_block @ update, alpha=-1)

    def deltas(self, drop: torch.Tensor, keep: torch.Tensor, size: int) -> torch.Tensor:
        """[removed groups, kept groups]: the exact change of E from putting removed group I back and removing kept
        group J instead (``drop``, ``keep``: their units, ``size`` per group, in group order)."""
        if size == 1:
            return self._unit_deltas(drop, keep)
        s, gram = self.swept, self.gram
        out_idx, in_idx = drop.view(-1, size), keep.view(-1, size)
        h = s[out_idx[:, :, None], out_idx[:, None, :]]  # [I, d, d]  S_II (the Schur complement of the group)
        h_inv = spd_inverse(h)
        gram_ii = gram[out_idx[:, :, None], out_idx[:, None, :]]
        gain = (h_inv * gram_ii).sum((-2, -1))  # tr(H^-1 Gamma_II): E falls by this when I is put back
        z_jj = -s[in_idx[:, :, None], in_idx[:, None, :]]  # [J, d, d] the kept groups' precision blocks
        gram_jj = gram[in_idx[:, :, None], in_idx[:, None, :]]
        rows = []
        chunk = max(1, (1 << 22) // max(1, in_idx.shape[0] * size * size))
        for start in range(0, out_idx.shape[0], chunk):
            o = out_idx[start:start + chunk]
            s_ij = s[o[:, None, :, None], in_idx[None, :, None, :]]  # [i, J, d, d]
            g_ij = gram[o[:, None, :, None], in_idx[None, :, None, :]]
            a = h_inv[start:start + chunk, None] @ s_ij  # H^-1 S_IJ
            precision = z_jj[None] + s_ij.transpose(-1, -2) @ a  # the kept precision of J once I is back
            energy = (gram_jj[None] - g_ij.transpose(-1, -2) @ a - a.transpose(-1, -2) @ g_ij
                      + a.transpose(-1, -2) @ gram_ii[start:start + chunk, None] @ a)  # F1_J^T F1_J
            factor, info = torch.linalg.cholesky_ex(precision)
            if bool((info > 0).any()):
                cost = torch.linalg.solve(precision, energy).diagonal(dim1=-2, dim2=-1).sum(-1)
            else:
                cost = torch.cholesky_solve(energy, factor).diagonal(dim1=-2, dim2=-1).sum(-1)
            rows.append(cost.clamp_min(0) - gain[start:start + chunk, None])
        return torch.cat(rows)

    def _unit_deltas(self, drop: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        s, gram = self.swept, self.gram
        tiny = torch.finfo(s.dtype).tiny
        h = s.diagonal()[drop].clamp_min(tiny)  # H_ii
        g_out = gram.diagonal()[drop]
        z_in, g_in = -s.diagonal()[keep], gram.diagonal()[keep]  # Z_jj, ||F_j||^2
        rows = []
        chunk = max(1, (1 << 22) // max(1, len(keep)))
        for start in range(0, len(drop), chunk):
            o = drop[start:start + chunk]
            b = s[o][:, keep]  # B_ij
            a = b / h[start:start + chunk, None]
            energy = g_in[None] - 2 * a * gram[o][:, keep] + a * a * g_out[start:start + chunk, None]
            precision = (z_in[None] + a * b).clamp_min(tiny)  # Z_jj once i is back
            gain = g_out[start:start + chunk] / h[start:start + chunk]  # what putting i back recovers
            rows.append(energy.clamp_min(0) / precision - gain[:, None])
        return torch.cat(rows)


def swap_search(moment: torch.Tensor, weight: torch.Tensor, plan, removed: list[int], max_swaps: int,
                damping: float, rtol: float = 1e-9) -> tuple[list[int], int, float, float]:
    """Local search after a greedy choice, as in OSSCAR (docs/design.md §3.9): swap a removed group with a kept one
    of the same pool while that lowers the output error E(P) of the least-squares reconstruction
    (:func:`least_squares_error`), the best swap of all pairs first, at most ``max_swaps`` swaps.

    Returns the removed groups (each swapped one replaced in place, so the plan's schedule still holds), the
    number of swaps made, and E before and after.
    """
    size = plan.group_size
    drop_units = plan.units(removed, moment.device)
    mask = torch.ones(moment.shape[0], dtype=torch.bool, device=moment.device)
    mask[drop_units] = False
    keep_units = mask.nonzero().flatten()
    matrix, weight = damped(moment, damping), weight.to(moment)
    state = _SweptSite(matrix, weight, keep_units, drop_units.sort().values)
    before = state.error
    del matrix
    if max_swaps <= 0 or not len(removed) or len(removed) == plan.num_groups:
        return list(removed), 0, before, before
    result, swaps, position = list(removed), 0, {g: i for i, g in enumerate(removed)}
    for _ in range(max_swaps):
        best, pair = -rtol * max(state.error, torch.finfo(moment.dtype).tiny), None
        for pool in plan.pools:
            out_groups = [g for g in pool if g in position]
            in_groups = [g for g in pool if g not in position]
            if not out_groups or not in_groups:
                continue
            delta = state.deltas(plan.units(out_groups, moment.device), plan.units(in_groups, moment.device), size)
            flat = int(delta.argmin())
            value = float(delta.view(-1)[flat])
            if value < best:
                best, pair = value, (out_groups[flat // len(in_groups)], in_groups[flat % len(in_groups)])
        if pair is None:
            break
        back, out = pair
        state.sweep(plan.units([back], moment.device), into_kept=True)
        state.sweep(plan.units([out], moment.device), into_kept=False)
        slot = position.pop(back)
        position[out] = slot
        result[slot] = out
        swaps += 1
    if not swaps:
        return result, 0, before, before
    after = least_squares_error(moment, weight, plan.units(result, moment.device), damping)
    if after > before:  # rounding in the updates (a near-singular site): keep the greedy choice
        return list(removed), 0, before, before
    return result, swaps, before, after
