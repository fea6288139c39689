"""The method registry: a method turns one site's statistics into a Decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..stats import SiteStatistics


@dataclass
class RemovalPlan:
    """Which units may be removed together, and in what pattern.

    Units come in contiguous groups of ``group_size`` (1 for neurons, head_dim for heads,
    a KV group's width for whole KV groups). Each of ``rounds`` rounds removes one group
    from every pool, which is how GQA keeps the same number of query heads per KV group.
    """

    num_units: int
    group_size: int
    pools: list[list[int]]
    rounds: int

    @property
    def num_groups(self) -> int:
        return self.num_units // self.group_size

    @property
    def schedule(self) -> list[list[int]]:
        """The candidate pool of every removal step, in order."""
        return [pool for _ in range(self.rounds) for pool in self.pools]

    def units(self, groups: list[int], device: torch.device | None = None) -> torch.Tensor:
        groups_t = torch.as_tensor(groups, dtype=torch.long, device=device).reshape(-1)
        return (groups_t[:, None] * self.group_size + torch.arange(self.group_size, device=device)).flatten()

    def decision(self, removed_groups: list[int], device: torch.device, **kwargs) -> "Decision":
        keep, drop = split(self.num_units, self.units(removed_groups, device), device)
        return Decision(keep, drop, removed_groups=list(removed_groups), **kwargs)


def select_by_score(scores: torch.Tensor, plan: RemovalPlan) -> list[int]:
    """Follow the plan's schedule, each step removing the lowest-scored group left in its pool."""
    alive = torch.ones(plan.num_groups, dtype=torch.bool)
    removed = []
    scores = scores.detach().cpu()
    for pool in plan.schedule:
        candidates = [g for g in pool if alive[g]]
        best = min(candidates, key=lambda g: (float(scores[g]), g))
        alive[best] = False
        removed.append(best)
    return removed


@dataclass
class Decision:
    """What to do with one site: keep these units, fold the removed ones into the consumer.

    The consumer becomes W'_K = W_K + W_P coef and b' = b + W_P shift (DESIGN.md 2.1).
    ``coef`` None means no reconstruction; ``shift`` None means no bias change.
    """

    keep: torch.Tensor
    drop: torch.Tensor
    coef: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    removed_groups: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)


@dataclass
class MethodOptions:
    """Knobs shared by all methods, filled from the prune() arguments."""

    damping: float = 1e-6
    seed: int = 0


class PruningMethod:
    """Base class. ``decide`` gets the statistics, the removal plan, and whether the consumer
    can take a bias shift (it has a bias, or one may be added)."""

    name: ClassVar[str] = ""
    wants_added_bias: ClassVar[bool] = False  # default of add_bias=None for bias-less consumers

    def decide(self, stats: SiteStatistics, plan: RemovalPlan, bias_available: bool, options: MethodOptions, site_key: int) -> Decision:
        raise NotImplementedError


METHODS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available as ``method=cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> PruningMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]()


def split(num_units: int, drop: list[int] | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (keep, drop) index tensors."""
    drop_t = torch.as_tensor(drop, dtype=torch.long, device=device).sort().values
    mask = torch.ones(num_units, dtype=torch.bool, device=device)
    mask[drop_t] = False
    return mask.nonzero().flatten(), drop_t
