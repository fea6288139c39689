"""The linear algebra of SNP: damping, greedy ZCA and OBS elimination, least-squares reconstruction
(docs/design.md §2.3, §3)."""

from __future__ import annotations

import torch


def damped(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    """matrix + damping * mean(diag) * I (a floor keeps an all-zero matrix invertible)."""
    scale = matrix.diagonal().mean().clamp_min(torch.finfo(matrix.dtype).tiny)
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return matrix + (damping * scale) * eye


def robust_cholesky(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    """Cholesky factor of the damped matrix, raising the damping tenfold until it factors."""
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(damped(matrix, damping))
        if int(info) == 0:
            return factor
        damping = max(damping * 10, 1e-10)
    raise torch.linalg.LinAlgError("matrix is not positive definite even with heavy damping")


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
    removed, unique_variance = [], []
    scale = None if weights is None else weights.to(moment).clamp_min(torch.finfo(moment.dtype).tiny)
    for step in range(num_remove):
        priority = diag if scale is None else diag / scale
        p = int(torch.where(alive, priority, torch.full_like(diag, -torch.inf)).argmax())
        pivot = diag[p].clamp_min(torch.finfo(diag.dtype).tiny)
        col = precision[:, p] - cols[:, :step] @ cols[p, :step]
        cols[:, step] = col / pivot.sqrt()
        diag -= cols[:, step] ** 2
        alive[p] = False
        removed.append(p)
        unique_variance.append(float((1.0 if scale is None else scale[p]) / pivot))
    return removed, unique_variance


def greedy_obs_elimination(moment: torch.Tensor, weight: torch.Tensor, num_remove: int,
                           damping: float) -> tuple[list[int], list[float]]:
    """Structured OBS (ZipLM, OSSCAR; docs/design.md §3.5): remove, one at a time, the unit q whose removal adds
    the least consumer-output error given the reconstruction so far, err_q = ||W_eff[:, q]||^2 / [Q]_qq.

    W_eff starts as the consumer weight W [out, n]; removing q sets W_eff <- W_eff - W_eff[:, q] Q_q: / Q_qq (the
    least-squares fold of q into the remaining columns) and downdates Q like :func:`greedy_zca_elimination`
    (left-looking, O(n * step)); the W_eff update and the column energies cost O(n * out) per step. Returns
    the removed units and their err_q, which add up to the output error of the least-squares map on the rest.
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
    removed, errors = [], []
    for step in range(num_remove):
        error = torch.linalg.vector_norm(rows, dim=1).pow(2) / diag.clamp_min(tiny)
        p = int(torch.where(alive, error, torch.full_like(error, torch.inf)).argmin())
        pivot = diag[p].clamp_min(tiny)
        col = precision[:, p] - cols[:, :step] @ cols[p, :step]  # the current Q_:p
        rows.addr_(col, rows[p] / pivot, alpha=-1)  # W_eff <- W_eff - W_eff[:, p] Q_p: / Q_pp
        cols[:, step] = col / pivot.sqrt()
        diag -= cols[:, step] ** 2
        alive[p] = False
        removed.append(p)
        errors.append(float(error[p]))
    return removed, errors


def _lapack_pivoted_cholesky(precision: torch.Tensor, num_remove: int) -> tuple[list[int], list[float]] | None:
    """The same elimination by LAPACK's blocked pivoted Cholesky (``dpstrf``: largest remaining
    diagonal first), several times faster than the column loop on CPU. None when it stops early
    (numerically singular precision), where the loop's floors take over."""
    from scipy.linalg import lapack

    factor, pivots, rank, info = lapack.dpstrf(precision.numpy(), tol=-1.0, lower=1)
    if info < 0 or rank < num_remove:
        return None
    order = (torch.from_numpy(pivots[:num_remove]).long() - 1).tolist()
    diagonal = torch.from_numpy(factor.diagonal()[:num_remove].copy()).pow(2)
    return order, (1.0 / diagonal).tolist()


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


def greedy_group_elimination(moment: torch.Tensor, plan, damping: float, weight: torch.Tensor | None = None,
                             update_weight: bool = False) -> tuple[list[int], list[float]]:
    """Group version of the greedy elimination, following ``plan.schedule``.

    At each step, among the step's candidate groups, remove the group g with the least
    unique variance r_g = tr(([Q]_gg)^{-1}) (Q the precision of the remaining units), then
    downdate Q by the Schur complement of that block (rank group_size). Returns the
    removed groups in order and their r_g, the conditional variance each kept last. With the
    consumer ``weight`` W the score is the output error tr(W_g ([Q]_gg)^{-1} W_g^T) instead.
    With ``update_weight`` (structured OBS, docs/design.md §3.5) W is the reconstruction so far, W_eff: after
    removing g, W_eff <- W_eff - W_eff[:, g] ([Q]_gg)^{-1} Q_g:.
    """
    precision = torch.cholesky_inverse(robust_cholesky(moment, damping))
    weight = None if weight is None else weight.to(moment)
    alive = [True] * plan.num_groups
    removed, unique_variance = [], []
    for pool in plan.schedule:
        candidates = [g for g in pool if alive[g]]
        idx = plan.units(candidates, moment.device).view(len(candidates), plan.group_size)
        blocks = spd_inverse(precision[idx[:, :, None], idx[:, None, :]])
        if weight is None:
            scores = blocks.diagonal(dim1=-2, dim2=-1).sum(-1)
        else:
            w = weight[:, idx].permute(1, 0, 2)  # [candidates, out, group]
            scores = torch.einsum("com,cmn,con->c", w, blocks, w)
        best = int(torch.argmin(scores))
        group, units = candidates[best], idx[best]
        cross = precision[:, units]
        solved = torch.linalg.solve(precision[units][:, units], cross.T)  # ([Q]_gg)^{-1} Q_g:
        if update_weight:
            weight = weight - weight[:, units] @ solved
        precision = precision - cross @ solved
        alive[group] = False
        removed.append(group)
        unique_variance.append(float(scores[best]))
    return removed, unique_variance


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
