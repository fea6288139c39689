"""What a prunable site must provide, split by who reads it (docs/design.md §8.2).

* :class:`SiteUnits`, the method side: what the units are (how many, how they group into a
  :class:`RemovalPlan`), what removing them costs in parameters and widths, the consumer's weight and
  bias facts. Allocation, preflight and the method's ``SiteInputs`` read only this.
* :class:`SiteCut`, the engine side: how the engine observes the units (statistics, hooks, where the
  statistics forward may stop), asks for a decision, cuts, describes the layer record and, on resume,
  re-cuts to a recorded shape.

A :class:`Site` is both; ``hf_snp.units.sites.ConsumerSite`` implements most of them for a site whose
units enter one consumer module. A method reaches a site only through ``SiteInputs``; a site calls
the method through the one-member ``Decides`` (both in ``hf_snp.units.site_inputs``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .removal import Decision, RemovalPlan
from .site_inputs import Decides, SiteInputs

if TYPE_CHECKING:
    from ..config import PruneConfig
    from ..models.modeling_hf_snp import LayerShape
    from .records import LayerRecord


@runtime_checkable
class SiteUnits(Protocol):
    """The method side of a site: its units, their removal plan and costs, its consumer's weight and bias."""

    kind: ClassVar[str]  # the target: "mlp", "heads" or "experts"
    width_multiple: ClassVar[int]  # the widths the site may take are multiples of this (besides round_to)
    tied: ClassVar[bool]  # every site of this kind in the layer takes the same steps (stacked experts)
    can_add_bias: ClassVar[bool]  # may a bias be added to the consumer (a mean shift, add_bias=True)?
    index: int  # the layer

    @property
    def slot(self) -> str:
        """What the site is within its layer (its kind; one expert of a mixture: "expert 3")."""

    @property
    def num_units(self) -> int: ...

    @property
    def consumer_weight(self) -> torch.Tensor:
        """The consumer's weight as [outputs, units], detached."""

    @property
    def consumer_has_bias(self) -> bool: ...

    def plan(self, steps: int) -> RemovalPlan:
        """The groups ``steps`` removal steps may take, and their pattern."""

    def max_steps(self) -> int: ...

    def curve_steps(self) -> int:
        """Steps of the full order (the cost curve's normalisation includes every group)."""

    def width_after(self, steps: int) -> int:
        """Width (MLP neurons, query heads, experts) after ``steps`` removal steps."""

    def params_per_step(self) -> int: ...

    def params_removed(self, steps: int) -> int:
        """Parameters that ``steps`` removal steps take out of the site."""

    def step_table(self) -> tuple[list[int], list[int]]:
        """``width_after(s)`` and ``params_removed(s)`` for every step count s from 0 to ``max_steps()``."""

    def num_params(self) -> int: ...

    def shape_after(self, steps: int, bias_added: bool = False) -> "LayerShape":
        """The site's part of its layer's shape after ``steps`` removal steps (for checks before pruning)."""


@runtime_checkable
class SiteCut(Protocol):
    """The engine side of a site: observe, decide, cut, describe, re-cut on resume."""

    ridge: float | None  # the λ its reconstruction used, when chosen on held-out tokens (§3.8)
    choice: str | None  # the candidate decision chosen on held-out tokens (ordering='heldout', §3.12)
    post_norm: nn.Module | None  # the norm after the consumer's output, whose errors it measures (§3.11)

    @property
    def name(self) -> str: ...

    @property
    def consumer_linear(self) -> nn.Module:
        """The module whose input is the units."""

    @property
    def stop_module(self) -> nn.Module:
        """The module whose forward pre-hook finds this site's statistics complete."""

    def new_statistics(self, device: torch.device, folds: int = 1): ...

    def observe(self, stats) -> list:
        """Hooks that feed ``stats`` (objects with ``remove()``)."""

    def decide(self, method: Decides, inputs: SiteInputs, config: "PruneConfig") -> Decision: ...

    def apply(self, decision: Decision) -> None: ...

    def describe(self) -> "LayerRecord":
        """The site's part of its layer's record."""

    def reshape_like(self, record: "LayerRecord") -> None:
        """Cut the site to the shapes a record describes (weights to be loaded afterwards)."""


@runtime_checkable
class Site(SiteUnits, SiteCut, Protocol):
    """A prunable site: both sides."""
