"""Per-site activation statistics (docs/design.md §2): s = sum h, G = sum h h^T, T = token count; and the
cross moments of the dense and pruned models' units for dense-target reconstruction (§3.7).

Accumulated in float32 on the execution device. The running sums are taken around a
shift c (the mean of the first batch) so that the covariance does not lose its small
directions to the cancellation in G/T - mu mu^T.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class NonFiniteActivationError(RuntimeError):
    """Raised when a site sees NaN or inf activations."""


class SiteStatistics:
    """Running first and second moments of the units entering one site's consumer.

    With ``folds`` k > 1 (held-out ridge, docs/design.md §3.8) each batch's tokens (after the mask) are split into
    k contiguous parts, part f going to fold f; every fold keeps its own sums around the common shift, and the
    full statistics are their sums (the same tokens, no extra accumulation)."""

    def __init__(self, name: str, num_units: int, device: torch.device, folds: int = 1):
        self.name = name
        self.n = num_units
        self.shift: torch.Tensor | None = None
        self.fold_sums = [torch.zeros(num_units, dtype=torch.float32, device=device) for _ in range(folds)]
        self.fold_grams = [torch.zeros(num_units, num_units, dtype=torch.float32, device=device) for _ in range(folds)]
        self.fold_counts = [0] * folds
        self.token_mask: torch.Tensor | None = None  # [B*L] bool for the batch being run
        # G is symmetric: only its upper block triangle is accumulated, one row panel [a:b, a:] per
        # product (8 panels: 56% of the full product's work; measured 0.225 s against 0.351 s at 1536 units)
        parts = max(1, min(8, num_units // 192))
        edges = [round(i * num_units / parts) for i in range(parts + 1)]
        self.panels = list(zip(edges, edges[1:]))

    @property
    def folds(self) -> int:
        return len(self.fold_counts)

    @property
    def count(self) -> int:
        return sum(self.fold_counts)

    @property
    def shifted_sum(self) -> torch.Tensor:
        return self.fold_sums[0] if self.folds == 1 else torch.stack(self.fold_sums).sum(0)

    def update(self, h: torch.Tensor) -> None:
        h = h.reshape(-1, self.n)
        if self.token_mask is not None:
            h = h[self.token_mask.to(h.device)]
        if h.shape[0] == 0:
            return
        h = h.to(torch.float32)
        if self.shift is None:
            self.shift = h.mean(0)
        h = h - self.shift
        parts = [h] if self.folds == 1 else torch.tensor_split(h, self.folds)
        for fold, part in enumerate(parts):
            batch_sum = part.sum(0)
            if not torch.isfinite(batch_sum).all():  # a NaN or inf anywhere in h reaches its column's sum
                raise NonFiniteActivationError(
                    f"NaN or inf in the activations entering {self.name}; check the model's dtype "
                    "(fp16 overflow) or its weights before pruning."
                )
            self.fold_sums[fold] += batch_sum
            for a, b in self.panels:
                self.fold_grams[fold][a:b, a:].addmm_(part[:, a:b].T, part[:, a:])
            self.fold_counts[fold] += part.shape[0]

    def hook(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook for the consumer linear: its input is the unit vector h."""
        self.update(args[0])

    def moments(self, centered: bool, folds: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, mu) in float64 over the tokens of ``folds`` (default: all): M is the covariance (centered) or the
        raw second moment."""
        folds = list(range(self.folds) if folds is None else folds)
        count = sum(self.fold_counts[f] for f in folds)
        if count == 0:
            raise RuntimeError(f"no calibration tokens reached {self.name}")
        moment = _total(self.fold_grams, folds).div_(count)  # in place throughout: one n x n float64 buffer
        for a, b in self.panels:  # the lower block triangle from the upper one
            moment[b:, a:b] = moment[a:b, b:].T
        mean_shifted = _total(self.fold_sums, folds) / count
        moment.addr_(mean_shifted, mean_shifted, alpha=-1)  # the covariance
        for a, b in self.panels:  # diagonal blocks were summed whole: make them exactly symmetric
            block = moment[a:b, a:b]
            block.copy_((block + block.T) / 2)
        mu = mean_shifted + self.shift.to(torch.float64)
        if centered:
            return moment, mu
        return moment.addr_(mu, mu), mu


def _total(parts: list[torch.Tensor], folds: list[int]) -> torch.Tensor:
    """The float64 sum of the folds' float32 sums."""
    total = parts[folds[0]].to(torch.float64, copy=True)
    for fold in folds[1:]:
        total += parts[fold]
    return total


class CrossMoments:
    """Running cross moments of the dense model's units h^d and the pruned model's h~ at one site, paired token by
    token (docs/design.md §3.7): E[(h^d - mu^d)(h~ - mu~)^T] or E[h^d h~^T], and mu^d. Accumulated in float32 around
    shifts (each stream's first-batch mean), like :class:`SiteStatistics`."""

    def __init__(self, name: str, num_units: int, device: torch.device):
        self.name, self.n = name, num_units
        self.shifts: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sum_dense = torch.zeros(num_units, dtype=torch.float32, device=device)
        self.sum_pruned = torch.zeros(num_units, dtype=torch.float32, device=device)
        self.cross = torch.zeros(num_units, num_units, dtype=torch.float32, device=device)
        self.count = 0
        self.token_mask: torch.Tensor | None = None  # [B*L] bool for the batch being run (both streams)

    def update(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        """Add one batch: ``dense`` and ``pruned`` are the same tokens' units in the two models."""
        dense, pruned = dense.reshape(-1, self.n), pruned.reshape(-1, self.n).to(dense.device)
        if dense.shape != pruned.shape:
            raise RuntimeError(f"{self.name}: {dense.shape[0]} dense and {pruned.shape[0]} pruned tokens to pair")
        if self.token_mask is not None:
            mask = self.token_mask.to(dense.device)
            dense, pruned = dense[mask], pruned[mask]
        if dense.shape[0] == 0:
            return
        dense, pruned = dense.to(torch.float32), pruned.to(torch.float32)
        if self.shifts is None:
            self.shifts = (dense.mean(0), pruned.mean(0))
        dense, pruned = dense - self.shifts[0], pruned - self.shifts[1]
        batch_sum = dense.sum(0)
        if not torch.isfinite(batch_sum).all():  # the pruned units are checked by their SiteStatistics
            raise NonFiniteActivationError(f"NaN or inf in the dense model's activations entering {self.name}")
        self.sum_dense += batch_sum
        self.sum_pruned += pruned.sum(0)
        self.cross.addmm_(dense.T, pruned)
        self.count += dense.shape[0]

    def moments(self, centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, mu^d) in float64: C the cross covariance (centered) or the raw cross moment E[h^d h~^T]."""
        if self.count == 0:
            raise RuntimeError(f"no calibration tokens reached {self.name}")
        mean_dense = self.sum_dense.to(torch.float64) / self.count
        mean_pruned = self.sum_pruned.to(torch.float64) / self.count
        cross = self.cross.to(torch.float64) / self.count - torch.outer(mean_dense, mean_pruned)
        mu_dense = mean_dense + self.shifts[0].to(torch.float64)
        if centered:
            return cross, mu_dense
        return cross + torch.outer(mu_dense, mean_pruned + self.shifts[1].to(torch.float64)), mu_dense
