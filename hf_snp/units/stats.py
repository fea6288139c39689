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


def norm_eps(norm: nn.Module | None) -> float:
    """The ε an RMS norm adds to the mean square (``variance_epsilon`` or ``eps``; 1e-6 when it names none)."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


class PostNormMetric:
    """The consumer-output error after a post-norm, at first order (docs/design.md §3.11). A norm
    z = g ⊙ y / r(y), r(y)² = mean(y²) + ε, follows the consumer output y (Gemma 2/3, OLMo 2). A small change δy moves
    z by J δy, J = (G / r)(I − y vᵀ), G = diag(g), v = y / (d r²). The error Σ_t |J_t δy_t|² / T is taken with token
    weights w_t = 1/r_t² in the statistics and S = Σ_t w_t (I − v_t y_tᵀ) G² (I − y_t v_tᵀ) / Σ_t w_t in the
    objective's weight, W' = S^½ W (as if δy and the token's direction were independent).

    Running sums, [d, d] float32 on the device: C₁ = Σ w v (G² y)ᵀ and C₂ = Σ w (yᵀ G² y) v vᵀ;
    S = G² − (C₁ + C₁ᵀ)/Σw + C₂/Σw."""

    def __init__(self, gain: torch.Tensor, eps: float, device: torch.device):
        self.gain_sq = gain.to(device, torch.float32).pow(2)
        self.eps = eps
        d = gain.numel()
        self.cross = torch.zeros(d, d, dtype=torch.float32, device=device)
        self.energy = torch.zeros(d, d, dtype=torch.float32, device=device)

    @classmethod
    def of(cls, norm: nn.Module, outputs: int, device: torch.device) -> "PostNormMetric":
        """The metric of ``norm`` (an RMS norm over ``outputs`` dimensions): its gain is its output for an all-ones
        input (mean square 1), whatever its parametrisation (g, or Gemma's 1 + w); its ε: :func:`norm_eps`."""
        eps = norm_eps(norm)
        parameter = next(norm.parameters(), None)  # offloaded (meta) weights come to ``device`` in its forward
        home = device if parameter is None or parameter.device.type == "meta" else parameter.device
        ones = torch.ones(1, outputs, device=home, dtype=torch.float32 if parameter is None else parameter.dtype)
        with torch.no_grad():
            gain = norm(ones)[0].to(torch.float64) * (1.0 + eps) ** 0.5
        return cls(gain, eps, device)

    def token_weights(self, output: torch.Tensor) -> torch.Tensor:
        """w_t = 1 / r_t² for each token of the consumer output [..., d] (float32, flattened)."""
        y = output.reshape(-1, self.gain_sq.numel()).float()
        return 1.0 / (y.pow(2).mean(-1) + self.eps)

    def update(self, output: torch.Tensor, weights: torch.Tensor) -> None:
        """Add tokens of the consumer output [T, d] with their weights [T] (masked already)."""
        y, weights = output.reshape(-1, self.gain_sq.numel()).float(), weights.float()
        d = y.shape[1]
        v = y * (weights / d)[:, None]  # y / (d r²)
        scaled = y * self.gain_sq  # G² y
        self.cross.addmm_((v * weights[:, None]).T, scaled)
        self.energy.addmm_((v * (weights * (y * scaled).sum(-1))[:, None]).T, v)

    def matrix(self, total_weight: torch.Tensor | float) -> torch.Tensor:
        """S in float64."""
        cross = self.cross.to(torch.float64) / total_weight
        metric = self.energy.to(torch.float64) / total_weight - cross - cross.T
        metric.diagonal().add_(self.gain_sq.to(torch.float64))
        return (metric + metric.T) / 2

    def root(self, total_weight: torch.Tensor | float) -> torch.Tensor:
        """S^½ (symmetric; S is a mean of JᵀJ's, so positive semi-definite up to rounding: clamped)."""
        values, vectors = torch.linalg.eigh(self.matrix(total_weight))
        return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


class SiteStatistics:
    """Running first and second moments of the units entering one site's consumer.

    With ``folds`` k > 1 (held-out ridge, docs/design.md §3.8) each batch's tokens (after the mask) are split into
    k contiguous parts, part f going to fold f; every fold keeps its own sums around the common shift, and the
    full statistics are their sums (the same tokens, no extra accumulation).

    Tokens may carry weights (``update(h, weights)``: a consumer followed by a norm, docs/design.md §3.11): then
    the sums are weighted, ``fold_weights`` holds each fold's total weight, and the moments are weighted means."""

    def __init__(self, name: str, num_units: int, device: torch.device, folds: int = 1, weighted: bool = False,
                 post_norm: PostNormMetric | None = None):
        self.name = name
        self.n = num_units
        self.shift: torch.Tensor | None = None
        self.fold_sums = [torch.zeros(num_units, dtype=torch.float32, device=device) for _ in range(folds)]
        self.fold_grams = [torch.zeros(num_units, num_units, dtype=torch.float32, device=device) for _ in range(folds)]
        self.fold_counts = [0] * folds
        # per fold: the tokens' total weight, a float64 scalar on the device (weighted updates only; no host read)
        self.fold_weights: list[torch.Tensor] | None = None
        self.post_norm = post_norm  # the consumer output's post-norm: weights and metric (docs/design.md §3.11)
        if weighted or post_norm is not None:
            self.fold_weights = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(folds)]
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
    def weighted(self) -> bool:
        return self.fold_weights is not None

    def fold_mass(self, fold: int) -> int | torch.Tensor:
        """What fold ``fold``'s moments are divided by: its token count, or its tokens' total weight."""
        return self.fold_counts[fold] if self.fold_weights is None else self.fold_weights[fold]

    @property
    def mean_weight(self) -> float:
        """The tokens' mean weight (1 without weights): the weighted moments times it give sums over tokens / T."""
        return 1.0 if self.fold_weights is None else float(sum(self.fold_weights)) / max(self.count, 1)

    @property
    def shifted_sum(self) -> torch.Tensor:
        return self.fold_sums[0] if self.folds == 1 else torch.stack(self.fold_sums).sum(0)

    def update(self, h: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add a batch of unit vectors ``h`` [..., n]; ``weights`` [...]: one per token, given on every update of
        weighted statistics and on none of others."""
        h = h.reshape(-1, self.n)
        if weights is not None:
            weights = weights.reshape(-1)
        if self.token_mask is not None:
            mask = self.token_mask.to(h.device)
            h = h[mask]
            weights = None if weights is None else weights[mask]
        if (weights is None) != (self.fold_weights is None):
            raise RuntimeError(f"{self.name}: token weights given to {'un' * (weights is not None)}weighted statistics")
        if h.shape[0] == 0:
            return
        h = h.to(torch.float32)
        if self.shift is None:
            self.shift = h.mean(0)
        h = h - self.shift
        parts = [h] if self.folds == 1 else torch.tensor_split(h, self.folds)
        weight_parts = [None] * len(parts) if weights is None else torch.tensor_split(weights.to(h), self.folds)
        for fold, (part, weight) in enumerate(zip(parts, weight_parts)):
            scaled = part if weight is None else part * weight[:, None]
            batch_sum = scaled.sum(0)
            if not torch.isfinite(batch_sum).all():  # a NaN or inf anywhere in h reaches its column's sum
                raise NonFiniteActivationError(
                    f"NaN or inf in the activations entering {self.name}; check the model's dtype "
                    "(fp16 overflow) or its weights before pruning."
                )
            self.fold_sums[fold] += batch_sum
            for a, b in self.panels:
                self.fold_grams[fold][a:b, a:].addmm_(scaled[:, a:b].T, part[:, a:])
            self.fold_counts[fold] += part.shape[0]
            if weight is not None:
                self.fold_weights[fold] += weight.sum(dtype=torch.float64)

    def update_after_norm(self, h: torch.Tensor, output: torch.Tensor) -> None:
        """Add a batch whose consumer output ``output`` [..., d] passes through the post-norm: each token weighted
        by 1 / its output's mean square, and the norm's metric summed (docs/design.md §3.11)."""
        weights = self.post_norm.token_weights(output)
        y = output.reshape(weights.shape[0], -1)
        if self.token_mask is not None:
            mask = self.token_mask.to(y.device)
            self.post_norm.update(y[mask], weights[mask])
        else:
            self.post_norm.update(y, weights)
        self.update(h, weights)

    def hook(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook for the consumer linear: its input is the unit vector h."""
        self.update(args[0])

    def mean(self, folds: Sequence[int]) -> torch.Tensor:
        """The (weighted) mean of the units over the tokens of ``folds``, in float64 (no n x n moment formed)."""
        count = sum(self.fold_mass(f) for f in folds)
        return _total(self.fold_sums, list(folds)) / count + self.shift.to(torch.float64)

    def moments(self, centered: bool, folds: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, mu) in float64 over the tokens of ``folds`` (default: all): M is the covariance (centered) or the
        raw second moment (weighted: the weighted ones)."""
        folds = list(range(self.folds) if folds is None else folds)
        if sum(self.fold_counts[f] for f in folds) == 0:
            raise RuntimeError(f"no calibration tokens reached {self.name}")
        count = sum(self.fold_mass(f) for f in folds)
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
