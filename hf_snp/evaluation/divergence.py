"""KL divergence to the dense model from its stored top-k log-probabilities, and top-1 agreement.

The dense distribution p is kept on its top-k tokens S, the rest of the vocabulary is one bucket, the tail
(mass p_T = 1 - sum_S p). The pruned distribution q is coarsened the same way (its own mass on S, the rest in its
tail). KL_k = sum_S p log(p/q) + p_T log(p_T/q_T) is the exact KL between the two coarsened distributions: by the
log-sum inequality it is a lower bound of the full KL(p || q), short of it by p_T KL(p(.|T) || q(.|T)), the
tail's own divergence weighted by the dense tail mass (zero when the tail is empty, or when both models share
the tail's shape). Log-probabilities in float32 (both sides alike), the sums in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_K = 64
TAIL_FLOOR = 1e-6


@dataclass
class TopK:
    """Dense top-k log-probabilities [T, k] (descending) and their token ids [T, k], one row per position."""

    logprobs: torch.Tensor
    ids: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, k: int = TOP_K) -> "TopK":
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        return cls(values, ids.to(torch.int32))

    @classmethod
    def cat(cls, parts: list["TopK"]) -> "TopK":
        k = parts[0].logprobs.shape[-1] if parts else TOP_K
        if not parts:
            return cls(torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int32))
        return cls(torch.cat([p.logprobs for p in parts]), torch.cat([p.ids for p in parts]))

    def tail_mass(self) -> torch.Tensor:
        """The dense probability outside the top k, per position."""
        return (1 - self.logprobs.double().exp().sum(-1)).clamp_min(0)


@dataclass
class Divergence:
    """Sums over positions (so that batches add up): KL in nats, top-1 agreements, positions."""

    kl: float = 0.0
    agree: int = 0
    count: int = 0

    def add(self, dense: TopK, logits: torch.Tensor) -> None:
        """Add the positions of ``logits`` [T, V] (the compared model's), aligned with ``dense`` [T, k]."""
        if logits.shape[0] != dense.logprobs.shape[0]:
            raise ValueError(f"{logits.shape[0]} positions to compare with {dense.logprobs.shape[0]} dense ones")
        self.kl += float(kl_topk(dense, logits).sum())
        self.agree += int((logits.argmax(-1).cpu() == dense.ids[:, 0].long()).sum())
        self.count += logits.shape[0]

    @property
    def mean_kl(self) -> float:
        return self.kl / self.count if self.count else float("nan")

    @property
    def agreement(self) -> float:
        return self.agree / self.count if self.count else float("nan")


def kl_topk(dense: TopK, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL_k(dense || compared) in nats (see the module docstring); ``logits`` [T, V]. A tail mass below
    TAIL_FLOOR is under the rounding of float32 log-probabilities: the dense tail counts as empty there, and the
    compared model's tail as TAIL_FLOOR."""
    q_all = torch.log_softmax(logits.float(), dim=-1).cpu()  # as the dense side was: a model is 0 from itself
    p = dense.logprobs.double()
    q = q_all.gather(-1, dense.ids.long()).double()
    head = (p.exp() * (p - q)).sum(-1)
    p_tail, q_tail = 1 - p.exp().sum(-1), (1 - q.exp().sum(-1)).clamp_min(TAIL_FLOOR)
    kept = p_tail > TAIL_FLOOR
    tail = torch.zeros_like(head)
    tail[kept] = p_tail[kept] * (p_tail[kept].log() - q_tail[kept].log())
    return head + tail


def kl_full(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position exact KL(dense || compared) over the whole vocabulary (for checks of the bound)."""
    p = torch.log_softmax(dense_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1)
