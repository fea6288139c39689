"""The ridge of SNP's least-squares map chosen on held-out calibration tokens (docs/design.md §3.8).

The statistics keep one Gram per fold (``SiteStatistics(folds=k)``). For each λ of a grid, the error is that of
the map fitted on the other folds, evaluated on one held-out fold: a quadratic form in the fold moments, so no
activation is kept. One eigendecomposition of the training M_KK serves the whole grid. The choice is made in
float32 with an error bound per λ, and again in float64 when the bounds leave it open (docs/design.md §3.8).
"""

from __future__ import annotations

from typing import Iterator

import torch

from .stats import SiteStatistics

RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1)  # λ relative to mean(diag M_KK), like ``linalg.damped``
BOUND_FACTOR = 0.05  # float32 error bound: this share of the first-order estimate (8x the most measured, §3.8)


def ridge_grid(damping: float) -> list[float]:
    """The candidates: the fixed grid and ``damping`` (so the choice never loses to it on held-out tokens)."""
    return sorted({*RIDGE_GRID, float(damping)})


def _output_factor(weight: torch.Tensor) -> torch.Tensor:
    """A matrix F with F^T F = W^T W and at most as many rows as columns (the error depends on W only so)."""
    if weight.shape[0] <= weight.shape[1]:
        return weight
    return torch.linalg.qr(weight, mode="r")[1]


def _removed_factor(stats: SiteStatistics, weight: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """F for W_P (the removed units' columns of W), float64 on the statistics device."""
    return _output_factor(weight.to(torch.float64)[:, drop.to(weight.device)]).to(stats.fold_sums[0].device)


def _held_out_folds(stats: SiteStatistics) -> Iterator[tuple[int, list[int], float]]:
    """(fold, the other folds, 1.0): the one fold held out, the last that can be (it has tokens, and so do the
    others). One split, not k-fold cross-validation: one eigendecomposition a site instead of k, the same choices on
    SmolLM2 (docs/design.md §3.8)."""
    for fold in reversed(range(stats.folds)):
        others = [f for f in range(stats.folds) if f != fold]
        if stats.fold_counts[fold] and sum(stats.fold_counts[f] for f in others):
            yield fold, others, 1.0
            return


def heldout_errors(stats: SiteStatistics, centered: bool, weight: torch.Tensor, keep: torch.Tensor,
                   drop: torch.Tensor, grid: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per λ of ``grid``: the mean consumer-output error of predicting the removed units of the held-out fold f
    (:func:`_held_out_folds`) by the map B = M^{-f}_PK (M^{-f}_KK + λ·mean(diag M^{-f}_KK)·I)⁻¹ fitted on the other
    folds: tr(W_P (E_PP − B E_KP − E_PK Bᵀ + B E_KK Bᵀ) W_Pᵀ), E the moment of fold f (centred: about the training
    folds' mean, whose intercept the affine map takes). ``weight`` is the consumer's W [out, N]. All zeros when no
    fold can be held out. ``dtype``: of the eigendecomposition and products (float64 errors either way)."""
    return _errors_and_bounds(stats, centered, weight, keep, drop, grid, dtype)[0]


def _errors_and_bounds(stats: SiteStatistics, centered: bool, weight: torch.Tensor, keep: torch.Tensor,
                       drop: torch.Tensor, grid: list[float], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`heldout_errors` and a bound on each error's rounding (zero in float64)."""
    factor = _removed_factor(stats, weight, drop)
    errors = torch.zeros(len(grid), dtype=torch.float64, device=factor.device)
    bounds = torch.zeros_like(errors)
    ridges = torch.tensor(grid, dtype=torch.float64, device=factor.device)

    def blocks(folds: list[int]) -> tuple[torch.Tensor, ...]:
        """M_KK, M_PK, M_PP and μ over ``folds`` (the n x n moment is sliced, then freed)."""
        moment, mu = stats.moments(centered, folds)
        return moment[keep[:, None], keep], moment[drop[:, None], keep], moment[drop[:, None], drop], mu

    for fold, others, share in _held_out_folds(stats):
        fold_errors, fold_bounds = _fold_errors(blocks(others), blocks([fold]), centered, factor.to(dtype), keep,
                                                drop, ridges)
        errors += share * fold_errors
        bounds += share * fold_bounds
    return errors, bounds


def _fold_errors(train: tuple[torch.Tensor, ...], held: tuple[torch.Tensor, ...], centered: bool, factor: torch.Tensor,
                 keep: torch.Tensor, drop: torch.Tensor, ridges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out fold's term of :func:`heldout_errors` and its rounding bound, per λ, in ``factor``'s dtype, from
    the training folds' and the held fold's blocks (:func:`_errors_and_bounds`)."""
    dtype = factor.dtype
    kept, train_pk = train[0].to(dtype), train[1].to(dtype)
    held_kk, held_pk, held_pp = held[:3]
    if centered:  # the held fold about the training folds' mean
        shift = held[3] - train[3]
        shift_k, shift_p = shift[keep], shift[drop]
        held_kk = torch.addr(held_kk, shift_k, shift_k)
        held_pk = torch.addr(held_pk, shift_p, shift_k)
        held_pp = torch.addr(held_pp, shift_p, shift_p)
    held_kk, held_pk, held_pp = held_kk.to(dtype), held_pk.to(dtype), held_pp.to(dtype)
    values, vectors = torch.linalg.eigh(kept)
    fitted = factor @ train_pk @ vectors  # F M^{-f}_PK V: W_P B = fitted diag(d) V^T
    del train_pk
    seen = factor @ held_pk @ vectors
    quadratic = (fitted.T @ fitted).mul_(vectors.T @ held_kk @ vectors).double()
    linear = (fitted * seen).sum(0).double()
    constant = (factor @ held_pp * factor).sum().double()
    values = values.double()
    scale = kept.diagonal().double().mean().clamp_min(torch.finfo(torch.float64).tiny)
    shifted = values.clamp_min(0)[None, :] + ridges[:, None] * scale  # [λ, K]
    d = 1.0 / shifted.clamp_min(torch.finfo(dtype).tiny)
    errors = constant - 2 * d @ linear + ((d @ quadratic) * d).sum(1)
    if dtype == torch.float64:
        return errors, torch.zeros_like(errors)
    # first order: eigenvalues off by eps·max|Λ| move each d by that over the least shifted eigenvalue; products
    # round by eps·sqrt(K); both scale the sum of the terms' magnitudes (the cancellation of a small error)
    eps = torch.finfo(dtype).eps
    relative = eps * values.abs().max() / shifted.min(1).values + eps * len(values) ** 0.5
    magnitude = constant.abs() + 2 * d @ linear.abs() + ((d @ quadratic.abs()) * d).sum(1)
    return errors, BOUND_FACTOR * relative * magnitude


def choose_ridge(stats: SiteStatistics, centered: bool, weight: torch.Tensor, keep: torch.Tensor,
                 drop: torch.Tensor, damping: float) -> float:
    """The λ of ``ridge_grid(damping)`` with the least held-out error (ties: the smaller λ; ``damping`` when no
    fold can be held out): :func:`ridge_and_error`'s λ."""
    return ridge_and_error(stats, centered, weight, keep, drop, damping)[0]


def ridge_and_error(stats: SiteStatistics, centered: bool, weight: torch.Tensor, keep: torch.Tensor,
                    drop: torch.Tensor, damping: float) -> tuple[float, float | None]:
    """The λ of ``ridge_grid(damping)`` with the least held-out error, and that error (None when no fold can be held
    out: then λ is ``damping``). The errors are computed in float32 with bounds; unless every other λ's error is
    above the least one by more than both bounds, they are computed again in float64: the choice is float64's
    either way (the error returned: within its bound of float64's)."""
    grid = ridge_grid(damping)
    errors, bounds = _errors_and_bounds(stats, centered, weight, keep, drop, grid, torch.float32)
    if not bool(errors.any()):
        return float(damping), None
    best = int(torch.argmin(errors))
    apart = errors - bounds > errors[best] + bounds[best]
    apart[best] = True
    if not bool(apart.all()):
        errors = heldout_errors(stats, centered, weight, keep, drop, grid)
        best = int(torch.argmin(errors))
    return grid[best], float(errors[best])


def heldout_mean_error(stats: SiteStatistics, centered: bool, weight: torch.Tensor, drop: torch.Tensor
                       ) -> float | None:
    """The held-out consumer-output error of replacing the removed units by the other folds' mean (``centered``: a
    mean shift, VBP's compensation) or by nothing: tr(W_P E_PP Wᵀ_P), E the held-out fold's moment (about the
    other folds' mean when centred), the λ → ∞ limit of :func:`heldout_errors`. None when no fold can be held out."""
    factor = _removed_factor(stats, weight, drop)
    total, seen = 0.0, False
    for fold, others, share in _held_out_folds(stats):
        moment, mu = stats.moments(centered, [fold])
        held = moment[drop[:, None], drop]
        del moment
        if centered:
            shift = (mu - stats.mean(others))[drop]
            held = held.addr_(shift, shift)
        total = total + share * (factor @ held * factor).sum()
        seen = True
    return float(total) if seen else None
