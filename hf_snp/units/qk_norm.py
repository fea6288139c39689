"""Heads under q/k norms that span every head (OLMo 2; docs/design.md §5.5).

OLMo 2 normalises each token's whole query projection q ∈ R^{H·d} (and key projection, H_kv·d) by one RMS before
splitting it into heads. Cutting heads therefore (a) cuts the norms' weights to the kept heads' entries, and (b)
changes the RMS each token is divided by: the kept dims' RMS instead of all dims'. :class:`QKNormHeadSite` does (a)
and corrects (b) on average: the kept norm weights are multiplied by the least-squares scalar ``norm_scale`` that
best reproduces, over the calibration tokens, the dense model's normalised kept queries (keys). The per-token sums it
needs are taken by forward hooks on the q/k projections during the site's statistics run (``QKNormStatistics``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..models.modeling_hf_snp import AttentionLayout
from .removal import Decision
from .site_inputs import Decides, SiteInputs
from .sites import HeadSite, count_parameters
from .stats import norm_eps

if TYPE_CHECKING:
    from ..config import PruneConfig
    from .stats import SiteStatistics


@dataclass
class NormedDecision(Decision):
    """A head decision with the factors for the kept q_norm and k_norm weights (1.0: only cut)."""

    norm_scales: tuple[float, float] = (1.0, 1.0)


def norm_scale(sums: torch.Tensor | None, keep: list[int], head_dim: int, eps: float) -> float:
    """The scalar c minimising Σ_t ‖c·a_t·(w∘x)_K − b_t·(w∘x)_K‖² over the calibration tokens t (docs/design.md §5.5):
    ``sums`` [tokens, heads, 2] holds per head Σ x² and Σ (w∘x)² of the projection's rows, a_t and b_t are
    1/sqrt(mean square + eps) over the kept heads' dims and over all dims. 1.0 when every head stays, no head stays,
    or no token was seen."""
    if sums is None or not keep or len(keep) == sums.shape[1] or sums.shape[0] == 0:
        return 1.0
    sums = sums.to(torch.float64)
    plain, weighted = sums[..., 0], sums[..., 1]
    kept = torch.as_tensor(keep, dtype=torch.long, device=sums.device)
    a = (plain[:, kept].sum(1) / (len(keep) * head_dim) + eps).rsqrt()
    b = (plain.sum(1) / (plain.shape[1] * head_dim) + eps).rsqrt()
    energy = weighted[:, kept].sum(1)
    denominator = (a * a * energy).sum()
    return 1.0 if denominator <= 0 else float((a * b * energy).sum() / denominator)


class QKNormStatistics:
    """Per calibration token and head, Σ x² and Σ (w∘x)² over the head's rows of the query and key projections'
    outputs x (w: the norm's weight), float32 on the execution device: tokens × (H + H_kv) × 2 numbers."""

    def __init__(self):
        self.batches: dict[str, list[torch.Tensor]] = {"q": [], "k": []}

    def hooks(self, attention: nn.Module, layout: AttentionLayout, head_dim: int,
              mask_of: Callable[[], torch.Tensor | None]) -> list:
        """Forward hooks on the q and k projections (those with a whole-projection norm); ``mask_of()``: the
        running batch's token mask."""
        pairs = (("q", layout.q, layout.q_norm), ("k", layout.k, layout.k_norm))
        return [getattr(attention, proj).register_forward_hook(self._hook(key, getattr(attention, norm), head_dim,
                                                                          mask_of))
                for key, proj, norm in pairs if norm]

    def _hook(self, key: str, norm: nn.Module, head_dim: int, mask_of: Callable[[], torch.Tensor | None]):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = output.detach().reshape(-1, output.shape[-1]).to(torch.float32)
            mask = mask_of()
            if mask is not None:
                x = x[mask.to(x.device)]
            weighted = x * norm.weight.detach().to(x)
            per_head = [part.square().reshape(len(x), -1, head_dim).sum(-1) for part in (x, weighted)]
            self.batches[key].append(torch.stack(per_head, -1))
        return hook

    def sums(self, key: str) -> torch.Tensor | None:
        """[tokens, heads, 2] for "q" or "k" (None: not observed)."""
        batches = self.batches[key]
        return torch.cat(batches) if batches else None


class QKNormHeadSite(HeadSite):
    """Attention heads whose q/k norms normalise every head together (``AttentionLayout.q_norm``/``k_norm``).

    A head's entries of the norms' weights go with it (and count in its parameters). With ``correct`` the
    statistics run also takes the per-token sums of ``QKNormStatistics``, ``decide`` fits each norm's scalar for the
    method's kept heads (``NormedDecision``), and ``apply`` multiplies the kept weights by it."""

    def __init__(self, layer: nn.Module, index: int, layout: AttentionLayout, head_dim: int, gqa_mode: str,
                 correct: bool = True):
        super().__init__(layer, index, layout, head_dim, gqa_mode)
        self.correct = correct
        self.norm_stats: QKNormStatistics | None = None

    def _norm(self, name: str) -> nn.Module | None:
        return getattr(self.attention, name, None) if name else None

    # --- costs: the norms' weight entries go with their heads ---------------------------------------------------

    def _kv_rows_params(self, kv_heads: int) -> int:
        extra = kv_heads * self.head_dim if self._norm(self.layout.k_norm) is not None else 0
        return super()._kv_rows_params(kv_heads) + extra

    def params_per_step(self) -> int:
        extra = self.query_heads_per_step * self.head_dim if self._norm(self.layout.q_norm) is not None else 0
        return super().params_per_step() + extra

    def num_params(self) -> int:
        norms = [self._norm(name) for name in (self.layout.q_norm, self.layout.k_norm)]
        return super().num_params() + count_parameters(*(norm for norm in norms if norm is not None))

    # --- statistics, decision, cut ------------------------------------------------------------------------------

    def new_statistics(self, device: torch.device, folds: int = 1) -> "SiteStatistics":
        self.norm_stats = QKNormStatistics() if self.correct else None
        return super().new_statistics(device, folds)

    def observe(self, stats: "SiteStatistics") -> list:
        handles = super().observe(stats)
        if self.norm_stats is not None and self._linear(self.layout.q) is not None:
            handles += self.norm_stats.hooks(self.attention, self.layout, self.head_dim, lambda: stats.token_mask)
        return handles

    def decide(self, method: Decides, inputs: SiteInputs, config: "PruneConfig") -> Decision:
        decision = super().decide(method, inputs, config)
        if self.norm_stats is None:
            return decision
        keep_q, keep_kv = self.kept_heads(decision)
        scales = tuple(norm_scale(self.norm_stats.sums(key), keep, self.head_dim, norm_eps(self._norm(name)))
                       for key, keep, name in (("q", keep_q, self.layout.q_norm), ("k", keep_kv, self.layout.k_norm)))
        self.norm_stats = None
        fields = {field.name: getattr(decision, field.name) for field in dataclasses.fields(Decision)}
        return NormedDecision(**fields, norm_scales=scales)

    def apply(self, decision: Decision) -> None:
        keep_q, keep_kv = self.kept_heads(decision)
        q_scale, k_scale = getattr(decision, "norm_scales", (1.0, 1.0))
        norms = {name: (self._norm(name), scale) for name, scale in ((self.layout.q_norm, q_scale),
                                                                       (self.layout.k_norm, k_scale)) if name}
        super().apply(decision)
        self.norm_stats = None
        if not keep_q:  # an EmptyAttention: the norms went with the projections
            return
        for name, rows in self.layout.norm_rows(keep_q, keep_kv, self.head_dim).items():
            norm, scale = norms[name]
            cut_norm(norm, rows, scale)


def cut_norm(norm: nn.Module, rows: torch.Tensor, scale: float = 1.0) -> None:
    """Keep weight entries ``rows`` of a norm, times ``scale`` (computed in float64), in place."""
    weight = norm.weight.data[rows.to(norm.weight.device)]
    if scale != 1.0:
        weight = (weight.to(torch.float64) * scale).to(norm.weight.dtype)
    norm.weight = nn.Parameter(weight.contiguous(), requires_grad=norm.weight.requires_grad)
