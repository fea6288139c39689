"""Allocation across sites (docs/design.md §6): how many removal steps each site takes.

Uniform: every site loses the same fraction of its own parameters. Global: a dense statistics
pass gives each site the cost of each successive removal; one threshold across all sites gives
each its step count, and the threshold is searched so the removed parameters meet the budget.
The criterion: ``cumulative_variance`` (SNP: the LDL pivots in its order, so the cumulative curve is
the variance lost; VBP: raw variances), or ``output_error`` (the consumer-output error each step adds,
relative to the residual-stream energy at the layer, per parameter removed, each site held within a
band around its uniform fraction, §6.4). ``round_to`` and ``min_width`` restrict the widths a site may
take; without a ``round_to`` for MLP neurons, a site's kept width is a multiple of 8
(``default_multiple``, docs/design.md §6.1).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from .protocols import SiteUnits

if TYPE_CHECKING:
    from ..config import PruneConfig


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

    def allowed_flags(self, site: SiteUnits, widths: Sequence[int] | None = None) -> list[bool]:
        """Per step count s from 0 to ``site.max_steps()``: may the site take s steps (0 always; else its width
        after them is at least the target's ``min_width`` and a multiple of its ``round_to`` and of the site's own
        ``width_multiple``)? ``widths``: ``site.step_table()[0]`` when the caller has it."""
        multiple, least = math.lcm(self.multiple(site), site.width_multiple), self.min_width.get(site.kind, 0)
        widths = site.step_table()[0] if widths is None else widths
        return [s == 0 or (width >= least and width % multiple == 0) for s, width in enumerate(widths)]

    def multiple(self, site: SiteUnits) -> int:
        """The ``round_to`` of the site's target, else the default (MLP neurons: ``default_multiple``; heads: 1)."""
        if site.kind in self.round_to:
            return self.round_to[site.kind]
        return default_multiple(site.num_units) if site.kind == "mlp" else 1

    def rounds_by_default(self, site: SiteUnits) -> bool:
        """The site's widths are restricted by the default multiple, not by a ``round_to`` the user gave."""
        return site.kind not in self.round_to and self.multiple(site) > 1

    def allowed_steps(self, site: SiteUnits) -> list[int]:
        return [s for s, ok in enumerate(self.allowed_flags(site)) if ok]


def nearest_steps(site: SiteUnits, target_params: float, rules: WidthRules) -> int:
    """The allowed step count whose removed parameters come nearest the target (fewer on ties). Under the default
    multiple, the most steps that do not exceed the unrounded choice: the default rounding keeps a few more units
    rather than cutting more than asked, so it never costs quality."""
    widths, params_removed = site.step_table()
    return nearest_allowed(params_removed, rules.allowed_flags(site, widths), target_params,
                           _unrounded(site, rules, widths))


def nearest_allowed(params_removed: Sequence[int], allowed: Sequence[bool], target_params: float,
                    unrounded: Sequence[bool] | None = None) -> int:
    """:func:`nearest_steps` on a site's tables: ``params_removed`` and ``allowed`` per step count, and
    ``unrounded``, the counts allowed without the default multiple (None: the widths are not rounded by default)."""
    def nearest(flags: Sequence[bool]) -> int:
        return min((s for s, ok in enumerate(flags) if ok), key=lambda s: (abs(params_removed[s] - target_params), s))

    if unrounded is None:
        return nearest(allowed)
    limit = nearest(unrounded)
    return max(s for s, ok in enumerate(allowed) if ok and s <= limit)


def _unrounded(site: SiteUnits, rules: WidthRules, widths: Sequence[int]) -> list[bool] | None:
    """The step counts allowed without the default multiple, when the default multiple restricts the site."""
    if not rules.rounds_by_default(site):
        return None
    plain = WidthRules({**rules.round_to, site.kind: 1}, rules.min_width)
    return plain.allowed_flags(site, widths)


def convex_scores(params_removed: Sequence[int], costs: Sequence[float], allowed: Sequence[bool], low: int = 0,
                  high: int | None = None) -> list[float]:
    """The score of each step (one per step count 1..len(params_removed) - 1): the slope, in cost per parameter
    removed, of the lower convex hull of the cumulative cost against the removed parameters, over the allowed step
    counts from ``low`` to ``high`` (docs/design.md §6.4). Non-decreasing; on a convex curve, each step's own cost
    per parameter. Steps below ``low`` take the first slope, steps beyond ``high`` the last."""
    steps = len(params_removed) - 1
    high = steps if high is None else high
    cumulative = [0.0, *itertools.accumulate(costs[:steps])]
    hull: list[int] = []
    for s in (s for s in range(low, high + 1) if allowed[s]):
        while len(hull) >= 2 and _not_below(params_removed, cumulative, hull[-2], hull[-1], s):
            hull.pop()
        hull.append(s)
    edges = list(zip(hull, hull[1:]))
    slopes = [(cumulative[b] - cumulative[a]) / (params_removed[b] - params_removed[a]) for a, b in edges]
    scores = [slopes[0] if slopes else 0.0] * steps
    for (a, b), slope in zip(edges, slopes):
        scores[a:b] = [slope] * (b - a)
    scores[high:] = [slopes[-1] if slopes else 0.0] * (steps - high)
    return scores


def _not_below(x: Sequence[int], y: Sequence[float], a: int, b: int, c: int) -> bool:
    """Point b lies on or above the chord from a to c (so it is not a vertex of the lower hull)."""
    return (y[b] - y[a]) * (x[c] - x[b]) >= (y[c] - y[b]) * (x[b] - x[a])


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
    min_steps: int = 0  # a threshold's step count is clamped to [min_steps, max_steps] (the band of §6.4)
    max_steps: int | None = None  # None: every step
    unrounded: list[bool] | None = None  # step counts allowed without the default multiple (None: not rounded)
    energy: float | None = None  # output_error: the residual-stream energy E||x||^2 that divided the costs

    @classmethod
    def from_site(cls, site: SiteUnits, scores: list[float] | None, costs: list[float],
                  rules: WidthRules | None = None, energy: float | None = None) -> "SiteCurve":
        """``scores`` and ``costs`` have one entry per group removed in the full order. A step may remove
        several groups (GQA ``per_group``: one query head from every KV group): its cost is their sum, and
        its score the one of its last group. ``scores`` None: the per-parameter slopes of the step costs'
        convex hull (:func:`convex_scores`, allocation='output_error')."""
        rules = rules or WidthRules()
        per_step = max(len(costs) // max(site.curve_steps(), 1), 1)
        step_costs = [sum(costs[i:i + per_step]) for i in range(0, len(costs), per_step)]
        widths, params_removed = site.step_table()
        allowed = rules.allowed_flags(site, widths)
        if scores is None:
            step_scores = convex_scores(params_removed, step_costs, allowed)
        else:
            step_scores = scores[per_step - 1::per_step][: site.max_steps()]
        return cls(site.index, site.kind, step_scores, step_costs, params_removed, allowed, widths,
                   site.num_params(), unrounded=_unrounded(site, rules, widths), energy=energy)

    @property
    def key(self) -> tuple[int, str]:
        return self.layer, self.kind

    @property
    def top(self) -> int:
        """The most steps a threshold may give the site."""
        return len(self.scores) if self.max_steps is None else self.max_steps

    def steps_at(self, threshold: float) -> int:
        """The most steps whose scores are all <= threshold, clamped to [min_steps, max_steps], backed off to an
        allowed count (not below min_steps)."""
        steps = min(max(bisect.bisect_right(self.scores, threshold), self.min_steps), self.top)
        while steps > self.min_steps and not self.allowed[steps]:
            steps -= 1
        return steps

    def nearest_steps(self, target_params: float) -> int:
        """The step count uniform allocation gives a target of ``target_params`` (:func:`nearest_steps`)."""
        return nearest_allowed(self.params_removed, self.allowed, target_params, self.unrounded)

    def banded(self, fraction: float, band: float) -> "SiteCurve":
        """This curve held to removing ``fraction`` ± ``band`` of its parameters (the step counts uniform
        allocation gives those two targets), with its scores the convex-hull slopes within that range."""
        low = self.nearest_steps(max(fraction - band, 0.0) * self.total_params)
        high = max(self.nearest_steps(min(fraction + band, 1.0) * self.total_params), low)
        scores = convex_scores(self.params_removed, self.costs, self.allowed, low, high)
        return replace(self, scores=scores, min_steps=low, max_steps=high)

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
    bounds: dict[tuple[int, str], tuple[int, int]] | None = None  # output_error: each site's band, in steps
    curve_windows: int | None = None  # the calibration windows the curves came from (docs/design.md §6.5)


def allocate_global(curves: list[SiteCurve], target_params: float, fill: bool = False) -> Allocation:
    """One threshold across ``curves``, the one whose removed parameters come nearest ``target_params``. With
    ``fill``, the largest threshold that stays within the budget, then further steps in score order while each
    brings the total nearer the budget (:func:`_fill`; the threshold reported is the last step's score)."""
    thresholds = sorted({score for curve in curves for score in curve.scores})

    def level(index: int) -> float:
        return thresholds[index] if index >= 0 else float("-inf")

    def removed(index: int) -> int:
        return sum(curve.params_removed[curve.steps_at(level(index))] for curve in curves)

    low, high = -1, len(thresholds) - 1  # removed() is non-decreasing in the threshold index
    while low < high:
        middle = (low + high + 1) // 2
        if removed(middle) <= target_params:
            low = middle
        else:
            high = middle - 1
    if fill:
        return _fill(curves, target_params, level(low) if low >= 0 else None)
    candidates = [low] + ([low + 1] if low + 1 < len(thresholds) else [])
    best = min(candidates, key=lambda i: abs(removed(i) - target_params))
    steps = {curve.key: curve.steps_at(level(best)) for curve in curves}
    total = sum(curve.params_removed[steps[curve.key]] for curve in curves)
    return Allocation(steps, level(best) if best >= 0 else None, target_params, total)


def _fill(curves: list[SiteCurve], target_params: float, threshold: float | None) -> Allocation:
    """The steps of ``threshold`` (None: every site at its fewest), then the further steps in score order (each
    site's next allowed count in turn, sites in order on equal scores), each taken while it brings the total
    nearer ``target_params``; a site whose next count would not stops there."""
    steps = {curve.key: curve.steps_at(float("-inf") if threshold is None else threshold) for curve in curves}
    total = sum(curve.params_removed[steps[curve.key]] for curve in curves)
    further = sorted((curve.scores[count - 1], position, count) for position, curve in enumerate(curves)
                     for count in range(steps[curve.key] + 1, curve.top + 1) if curve.allowed[count])
    stopped: set[int] = set()
    for score, position, count in further:
        if total >= target_params:
            break
        curve = curves[position]
        if position in stopped:
            continue
        added = curve.params_removed[count] - curve.params_removed[steps[curve.key]]
        if abs(total + added - target_params) >= abs(total - target_params):
            stopped.add(position)
            continue
        steps[curve.key], total, threshold = count, total + added, score
    return Allocation(steps, threshold, target_params, total)


def site_budget(site: SiteUnits, config: "PruneConfig") -> float:
    """Parameters a site should lose under uniform allocation (its layer's or its target's fraction)."""
    if config.layer_sparsity and site.index in config.layer_sparsity:
        return config.sparsity_of_layer(site.index) * site.num_params()
    return config.target_sparsity(site.kind) * site.num_params()


def allocate_per_budget(curves: list[SiteCurve], config: "PruneConfig", scale: float = 1.0) -> Allocation:
    """One global threshold for all targets, or one per target with sparsity_per_target; every
    budget multiplied by ``scale``. With allocation='output_error' each site is held within
    ``allocation_band`` of its uniform fraction (:meth:`SiteCurve.banded`) and the threshold's
    level is filled to the budget (docs/design.md §6.4)."""
    banded = config.allocation_criterion == "output_error"
    if banded:
        curves = [c.banded(scale * config.target_sparsity(c.kind), config.allocation_band) for c in curves]
    if config.sparsity_per_target:
        groups = {t: [c for c in curves if c.kind == t] for t in config.unit_targets}
    else:
        groups = {"all": curves}
    steps, thresholds, target, removed = {}, {}, 0.0, 0
    for name, group in groups.items():
        fraction = config.target_sparsity(name) if name != "all" else config.sparsity
        budget = scale * fraction * sum(c.total_params for c in group)
        found = allocate_global(group, budget, fill=banded)
        steps.update(found.steps)
        thresholds[name] = found.threshold
        target, removed = target + budget, removed + found.removed_params
    bounds = {c.key: (c.min_steps, c.top) for c in curves} if banded else None
    return Allocation(steps, thresholds if len(thresholds) > 1 else thresholds.get("all"), target, removed, bounds)


def allocate_steps(config: "PruneConfig", rules: WidthRules, curves: list[SiteCurve] | None = None,
                   scale: float = 1.0) -> tuple[Callable[[SiteUnits], int], Allocation | None]:
    """The one allocation both the plain run and the block/unit search use: each site's step count,
    uniform (no ``curves``) or global (one threshold on ``curves``), for ``scale`` times the budgets
    that ``config`` sets (sparsity, sparsity_per_target, layer_sparsity)."""
    if curves is None:
        return (lambda site: nearest_steps(site, scale * site_budget(site, config), rules)), None
    plan = allocate_per_budget(curves, config, scale)
    return (lambda site: plan.steps[(site.index, site.kind)]), plan


def budget_scale(sites: list[SiteUnits], config: "PruneConfig", params: float) -> float:
    """The factor on ``config``'s budgets that makes ``sites`` lose ``params`` parameters in all."""
    planned = sum(site_budget(site, config) for site in sites)
    return params / planned if planned > 0 else 0.0


def describe_allocation(config: "PruneConfig", plan: Allocation | None, curves: list[SiteCurve] | None) -> dict:
    """The report's ``allocation`` entry: the mode ('uniform' or the global criterion) and width rules; for global
    allocation the threshold, the planned parameters and every site's retained-cost curve (downsampled); for
    'output_error' also the band, every layer's residual-stream energy and every site's band, steps and fraction
    removed."""
    report = {"mode": config.allocation_criterion or "uniform", "round_to": config.round_to,
              "min_width": config.min_width, "ordering": config.resolved_ordering, "reconstruct": config.reconstruct}
    if plan is not None:
        report.update(threshold=plan.threshold, curve_windows=plan.curve_windows,
                      target_params_removed=round(plan.target_params),
                      planned_params_removed=plan.removed_params,
                      curves={f"{c.layer}.{c.kind}": _downsample(c.retained()) for c in curves})
    if plan is not None and plan.bounds is not None:
        report.update(band=config.allocation_band,
                      residual_energy={str(c.layer): c.energy for c in curves if c.energy is not None},
                      sites={f"{c.layer}.{c.kind}": _site_entry(c, plan) for c in curves})
    return report


def _site_entry(curve: SiteCurve, plan: Allocation) -> dict:
    """One site under output_error: its steps, the fraction of its parameters removed, and its band."""
    steps, (low, high) = plan.steps[curve.key], plan.bounds[curve.key]

    def fraction(count: int) -> float:
        return round(curve.params_removed[count] / curve.total_params, 5)

    return {"steps": steps, "width": curve.width[steps], "fraction": fraction(steps), "band_steps": [low, high],
            "band_fractions": [fraction(low), fraction(high)]}


def _downsample(values: list[float], points: int = 65) -> list[float]:
    """Retained fraction after s removals, at ``points`` evenly spaced step counts."""
    if len(values) <= points:
        return [round(v, 5) for v in values]
    return [round(values[round(i * (len(values) - 1) / (points - 1))], 5) for i in range(points)]
