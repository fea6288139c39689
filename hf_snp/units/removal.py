"""Removal plans and decisions: which units a site may lose together, and what happens to them.

A site (``hf_snp.units.sites``) describes its geometry as a :class:`RemovalPlan`; a method turns
statistics into a :class:`Decision` that the site applies (docs/design.md §5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


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

    The consumer becomes W'_K = W_K + W_P coef and b' = b + W_P shift (docs/design.md §3.6, §5.3).
    ``coef`` None means no reconstruction; ``shift`` None means no bias change. With ``mix`` [N, K] (dense-target
    reconstruction, §3.7) every column takes part: W'_K = W mix, and ``shift`` spans all N units: b' = b + W shift.
    """

    keep: torch.Tensor
    drop: torch.Tensor
    coef: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    removed_groups: list[int] = field(default_factory=list)
    mix: torch.Tensor | None = None
    ridge: float | None = None  # the λ chosen on held-out tokens (ridge="heldout", docs/design.md §3.8)
    swaps: int | None = None  # swaps the local search made (swaps > 0, docs/design.md §3.9)
    swap_errors: tuple[float, float] | None = None  # the output error E(P) before and after them
    choice: str | None = None  # the candidate chosen on held-out tokens (ordering="heldout", docs/design.md §3.12)
    candidate_errors: dict[str, float] | None = None  # every candidate's held-out error (ordering="heldout")

    def to(self, device: torch.device) -> "Decision":
        """The same decision with its tensors on ``device`` (decisions travel between ranks on the CPU)."""
        moved = {name: getattr(self, name).to(device) for name in ("keep", "drop", "coef", "shift", "mix")
                 if getattr(self, name) is not None}
        return dataclasses.replace(self, **moved)

    def fold(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The consumer's new kept columns and its bias change (None: no change), from its weight W [out, N]."""
        device = weight.device
        if self.mix is not None:
            delta = None if self.shift is None else weight @ self.shift.to(device)
            return weight @ self.mix.to(device), delta
        w_keep, w_drop = weight[:, self.keep.to(device)], weight[:, self.drop.to(device)]
        if self.coef is not None:
            w_keep = w_keep + w_drop @ self.coef.to(device)
        return w_keep, None if self.shift is None else w_drop @ self.shift.to(device)


def split(num_units: int, drop: list[int] | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (keep, drop) index tensors."""
    drop_t = torch.as_tensor(drop, dtype=torch.long, device=device).sort().values
    mask = torch.ones(num_units, dtype=torch.bool, device=device)
    mask[drop_t] = False
    return mask.nonzero().flatten(), drop_t
