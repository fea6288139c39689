"""The method registry: a method turns one site's statistics into a Decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..stats import SiteStatistics


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
    info: dict = field(default_factory=dict)


@dataclass
class MethodOptions:
    """Knobs shared by all methods, filled from the prune() arguments."""

    damping: float = 1e-6
    seed: int = 0


class PruningMethod:
    """Base class. ``decide`` gets the statistics, how many units to remove, and whether the
    consumer can take a bias shift (it has a bias, or one may be added)."""

    name: ClassVar[str] = ""
    wants_added_bias: ClassVar[bool] = False  # default of add_bias=None for bias-less consumers

    def decide(
        self, stats: SiteStatistics, num_remove: int, bias_available: bool, options: MethodOptions, site_key: int
    ) -> Decision:
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
