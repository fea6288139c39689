"""The method registry: a method turns one site's statistics into a Decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..stats import SiteStatistics


def group_units(groups: list[int], size: int, device: torch.device | None = None) -> torch.Tensor:
    """Unit indices of contiguous groups of ``size`` units (group g = units g*size .. g*size+size-1)."""
    groups_t = torch.as_tensor(groups, dtype=torch.long, device=device).reshape(-1)
    return (groups_t[:, None] * size + torch.arange(size, device=device)).flatten()


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
        return group_units(groups, self.group_size, device)

    def decision(self, removed_groups: list[int], device: torch.device, **kwargs) -> "Decision":
        keep, drop = split(self.num_units, self.units(removed_groups, device), device)
        return Decision(keep, drop, removed_groups=list(removed_groups), **kwargs)


def select_by_score(scores: torch.Tensor, plan: RemovalPlan) -> list[int]:
    """Follow the plan's schedule, each step removing the lowest-scored group left in its pool
    (ties: the lower index). Each pool is ranked once and walked with a cursor past removed groups."""
    values = scores.detach().cpu().tolist()
    ranked = [sorted(pool, key=lambda g: (values[g], g)) for pool in plan.pools]
    cursor, alive, removed = [0] * len(ranked), [True] * plan.num_groups, []
    for _ in range(plan.rounds):
        for i, order in enumerate(ranked):
            while cursor[i] < len(order) and not alive[order[cursor[i]]]:
                cursor[i] += 1
            if cursor[i] == len(order):
                raise ValueError("a removal plan asked for more groups than its pool holds")
            best = order[cursor[i]]
            alive[best] = False
            removed.append(best)
    return removed


def group_sums(values: torch.Tensor, plan: RemovalPlan) -> torch.Tensor:
    return values.reshape(plan.num_groups, plan.group_size).sum(1)


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


ORDERINGS = ("zca", "natural", "random", "output_aware")


@dataclass
class MethodOptions:
    """Knobs shared by all methods, filled from the prune() arguments.

    ``ordering`` and ``reconstruct`` are SNP's ablation switches: which units go first
    (unnormalised ZCA, index order, random, or output-aware ZCA weighted by ||W_:,i||^2) and
    whether the removed units are rebuilt by least squares (False: only their mean is folded).
    """

    damping: float = 1e-6
    seed: int = 0
    ordering: str = "zca"
    reconstruct: bool = True


@dataclass
class SiteInputs:
    """What a method may look at for one site."""

    stats: SiteStatistics
    plan: RemovalPlan
    bias_available: bool  # the consumer has a bias, or one may be added
    consumer_weight: torch.Tensor  # W of the consumer linear (float32/64, on the stats device)
    key: int  # a stable id of the site, for seeding


class PruningMethod:
    """Base class. A method orders the groups a plan may remove (each step with its cost),
    and compensates the consumer for the removed ones.

    ``order`` follows ``plan.schedule`` and returns the removed groups and one cost per step
    (what that removal loses; the global allocation compares these across sites).
    ``global_scores`` turns a site's costs into the increasing scores a global threshold cuts.
    """

    name: ClassVar[str] = ""
    wants_added_bias: ClassVar[bool] = False  # default of add_bias=None for bias-less consumers

    def order(self, site: SiteInputs, options: MethodOptions) -> tuple[list[int], list[float]]:
        raise NotImplementedError

    def compensate(self, site: SiteInputs, decision: "Decision", options: MethodOptions) -> None:
        """Fill decision.coef / decision.shift (default: fold the removed units' means where possible)."""
        if site.bias_available and len(decision.drop):
            decision.shift = site.stats.moments(centered=True)[1][decision.drop]

    def decide(self, site: SiteInputs, options: MethodOptions) -> "Decision":
        removed, costs = self.order(site, options)
        decision = site.plan.decision(removed, site.stats.sum.device, info={"step_costs": costs})
        self.compensate(site, decision, options)
        return decision

    def global_scores(self, costs: list[float]) -> list[float]:
        """Cumulative fraction of the site's total cost removed after each step (normalised per site)."""
        total = sum(costs) or 1.0
        running, scores = 0.0, []
        for cost in costs:
            running += cost
            scores.append(running / total)
        return scores


class ScoredMethod(PruningMethod):
    """Removes the lowest-scored groups (a group's score: the sum of its units'); a step's cost
    is its score, and globally the raw scores form one ranking across sites."""

    def scores(self, site: SiteInputs) -> torch.Tensor:
        raise NotImplementedError

    def order(self, site: SiteInputs, options: MethodOptions) -> tuple[list[int], list[float]]:
        scores = group_sums(self.scores(site), site.plan)
        removed = select_by_score(scores, site.plan)
        return removed, [float(scores[g]) for g in removed]

    def global_scores(self, costs: list[float]) -> list[float]:
        """Raw scores, made non-decreasing."""
        scores, running = [], float("-inf")
        for cost in costs:
            running = max(running, cost)
            scores.append(running)
        return scores


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
