"""Allocation across sites (docs/design.md §6): how many removal steps each site takes.

Uniform: every site loses the same fraction of its own parameters. Global: a dense statistics
pass gives each site the cost of each successive removal (SNP: the LDL pivots in its order, so
the cumulative curve is the variance lost; VBP: raw variances); one threshold across all sites
gives each its step count, and the threshold is searched so the removed parameters meet the
budget. ``round_to`` and ``min_width`` restrict the widths a site may take; without a ``round_to`` for
MLP neurons, a site's kept width is a multiple of 8 (``default_multiple``, docs/design.md §6.1).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from .sites import Site

if TYPE_CHECKING:
    from .config import PruneConfig


# The default multiple of a kept MLP width: the smallest that gets (nearly) all the speed. GPU GEMMs need widths
# that are multiples of 8 (issue 17: Llama-7B MLP on an H100, bf16: width 7706 runs at 0.74x of dense, 7704 at
# 1.15x, 7680 at 1.16x); on CPU the multiple makes no measurable difference
# (benchmarks/results/inference_cpu_widths.md). Sites narrower than DEFAULT_MIN_UNITS keep any width.
DEFAULT_MULTIPLE = 8
DEFAULT_MIN_UNITS = 128


def default_multiple(num_units: int) -> int:
    """The multiple of a kept MLP width when no ``round_to`` is given: 8 from 128 neurons up, else 1."""
    return DEFAULT_MULTIPLE if num_units >= DEFAULT_MIN_UNITS else 1


@dataclass
class WidthRules:
    """Allowed widths per target: MLP neurons, or query heads for "heads". An MLP site without a ``round_to``
    takes ``default_multiple`` of its width."""

    round_to: dict[str, int] = field(default_factory=dict)
    min_width: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, round_to: int | Mapping[str, int] | None, min_width: int | Mapping[str, int] | None) -> "WidthRules":
        def per_target(value):
            if value is None:
                return {}
            # a plain number is about MLP widths
            return dict(value) if isinstance(value, Mapping) else {"mlp": int(value)}

        return cls(per_target(round_to), per_target(min_width))

    def allowed(self, site: Site, steps: int) -> bool:
        if steps == 0:
            return True
        width = site.width_after(steps)
        multiple = math.lcm(self.multiple(site), site.width_multiple)
        return width >= self.min_width.get(site.kind, 0) and width % multiple == 0

    def multiple(self, site: Site) -> int:
        """The ``round_to`` of the site's target, else the default (MLP neurons: ``default_multiple``; heads: 1)."""
        if site.kind in self.round_to:
            return self.round_to[site.kind]
        return default_multiple(site.num_units) if site.kind == "mlp" else 1

    def rounds_by_default(self, site: Site) -> bool:
        """The site's widths are restricted by the default multiple, not by a ``round_to`` the user gave."""
        return site.kind not in self.round_to and self.multiple(site) > 1

    def allowed_steps(self, site: Site) -> list[int]:
        return [s for s in range(site.max_steps() + 1) if self.allowed(site, s)]


def nearest_steps(site: Site, target_params: float, rules: WidthRules) -> int:
    """The allowed step count whose removed parameters come nearest the target (fewer on ties). Under the default
    multiple, the most steps that do not exceed the unrounded choice: the default rounding keeps a few more units
    rather than cutting more than asked, so it never costs quality."""
    def nearest(steps: list[int]) -> int:
        return min(steps, key=lambda s: (abs(site.params_removed(s) - target_params), s))

    allowed = rules.allowed_steps(site)
    if not rules.rounds_by_default(site):
        return nearest(allowed)
    unrounded = nearest(WidthRules({**rules.round_to, site.kind: 1}, rules.min_width).allowed_steps(site))
    return max(s for s in allowed if s <= unrounded)


@dataclass
class SiteCurve:
    """One site's removal costs in its pruning order, and what each step count removes."""

    layer: int
    kind: str
    scores: list[float]  # increasing: the global score of removing step s+1
    costs: list[float]  # what each removal loses (variance or output error)
    params_removed: list[int]  # after s steps, s = 0..max_steps
    allowed: list[bool]  # s = 0..max_steps
    width: list[int]  # width after s steps
    total_params: int  # all parameters of the site (the budget is a fraction of their sum)

    @classmethod
    def from_site(cls, site: Site, scores: list[float], costs: list[float],
                  rules: WidthRules | None = None) -> "SiteCurve":
        """``scores`` and ``costs`` have one entry per group removed in the full order. A step may remove
        several groups (GQA ``per_group``: one query head from every KV group): its cost is their sum, and
        its score the one of its last group."""
        rules = rules or WidthRules()
        steps = range(site.max_steps() + 1)
        per_step = max(len(costs) // max(site.curve_steps(), 1), 1)
        step_costs = [sum(costs[i:i + per_step]) for i in range(0, len(costs), per_step)]
        step_scores = scores[per_step - 1::per_step][: site.max_steps()]
        return cls(site.index, site.kind, step_scores, step_costs, [site.params_removed(s) for s in steps],
                   [rules.allowed(site, s) for s in steps], [site.width_after(s) for s in steps], site.num_params())

    @property
    def key(self) -> tuple[int, str]:
        return self.layer, self.kind

    def steps_at(self, threshold: float) -> int:
        """The most steps whose scores are all <= threshold, backed off to an allowed count."""
        steps = bisect.bisect_right(self.scores, threshold)
        while not self.allowed[steps]:
            steps -= 1
        return steps

    def retained(self) -> list[float]:
        """Fraction of the site's cost kept after s removals (the cumulative-variance curve, read backwards)."""
        total, running, kept = sum(self.costs) or 1.0, 0.0, [1.0]
        for cost in self.costs:
            running += cost
            kept.append(max(0.0, 1.0 - running / total))
        return kept


@dataclass
class Allocation:
    steps: dict[tuple[int, str], int]
    threshold: float | None
    target_params: float
    removed_params: int


def allocate_global(curves: list[SiteCurve], target_params: float) -> Allocation:
    """One threshold across ``curves``, the one whose removed parameters come nearest ``target_params``."""
    thresholds = sorted({score for curve in curves for score in curve.scores})

    def removed(threshold: float) -> int:
        return sum(curve.params_removed[curve.steps_at(threshold)] for curve in curves)

    low, high = -1, len(thresholds) - 1  # removed() is non-decreasing in the threshold index
    while low < high:
        middle = (low + high + 1) // 2
        if removed(thresholds[middle]) <= target_params:
            low = middle
        else:
            high = middle - 1
    candidates = [low] + ([low + 1] if low + 1 < len(thresholds) else [])
    best = min(candidates, key=lambda i: abs((removed(thresholds[i]) if i >= 0 else 0) - target_params))
    threshold = thresholds[best] if best >= 0 else float("-inf")
    steps = {curve.key: (curve.steps_at(threshold) if best >= 0 else 0) for curve in curves}
    total = sum(curve.params_removed[steps[curve.key]] for curve in curves)
    return Allocation(steps, threshold if best >= 0 else None, target_params, total)


def site_budget(site: Site, config: "PruneConfig") -> float:
    """Parameters a site should lose under uniform allocation (its layer's or its target's fraction)."""
    if config.layer_sparsity and site.index in config.layer_sparsity:
        return config.sparsity_of_layer(site.index) * site.num_params()
    return config.target_sparsity(site.kind) * site.num_params()


def allocate_per_budget(curves: list[SiteCurve], config: "PruneConfig", scale: float = 1.0) -> Allocation:
    """One global threshold for all targets, or one per target with sparsity_per_target; every
    budget multiplied by ``scale``."""
    if config.sparsity_per_target:
        groups = {t: [c for c in curves if c.kind == t] for t in config.unit_targets}
    else:
        groups = {"all": curves}
    steps, thresholds, target, removed = {}, {}, 0.0, 0
    for name, group in groups.items():
        fraction = config.target_sparsity(name) if name != "all" else config.sparsity
        budget = scale * fraction * sum(c.total_params for c in group)
        found = allocate_global(group, budget)
        steps.update(found.steps)
        thresholds[name] = found.threshold
        target, removed = target + budget, removed + found.removed_params
    return Allocation(steps, thresholds if len(thresholds) > 1 else thresholds.get("all"), target, removed)


def allocate_steps(config: "PruneConfig", rules: WidthRules, curves: list[SiteCurve] | None = None,
                   scale: float = 1.0) -> tuple[Callable[[Site], int], Allocation | None]:
    """The one allocation both the plain run and the block/unit search use: each site's step count,
    uniform (no ``curves``) or global (one threshold on ``curves``), for ``scale`` times the budgets
    that ``config`` sets (sparsity, sparsity_per_target, layer_sparsity)."""
    if curves is None:
        return (lambda site: nearest_steps(site, scale * site_budget(site, config), rules)), None
    plan = allocate_per_budget(curves, config, scale)
    return (lambda site: plan.steps[(site.index, site.kind)]), plan


def budget_scale(sites: list[Site], config: "PruneConfig", params: float) -> float:
    """The factor on ``config``'s budgets that makes ``sites`` lose ``params`` parameters in all."""
    planned = sum(site_budget(site, config) for site in sites)
    return params / planned if planned > 0 else 0.0


def describe_allocation(config: "PruneConfig", plan: Allocation | None, curves: list[SiteCurve] | None) -> dict:
    """The report's ``allocation`` entry: the mode and width rules; for global allocation the
    threshold, the planned parameters and every site's retained-cost curve (downsampled)."""
    report = {"mode": config.resolved_allocation, "round_to": config.round_to, "min_width": config.min_width,
              "ordering": config.ordering, "reconstruct": config.reconstruct}
    if plan is not None:
        report.update(threshold=plan.threshold, target_params_removed=round(plan.target_params),
                      planned_params_removed=plan.removed_params,
                      curves={f"{c.layer}.{c.kind}": _downsample(c.retained()) for c in curves})
    return report


def _downsample(values: list[float], points: int = 65) -> list[float]:
    """Retained fraction after s removals, at ``points`` evenly spaced step counts."""
    if len(values) <= points:
        return [round(v, 5) for v in values]
    return [round(values[round(i * (len(values) - 1) / (points - 1))], 5) for i in range(points)]
