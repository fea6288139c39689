"""The greedy algorithms against exhaustive search on small cases.

Each greedy step is checked against its defining formula computed the slow way (explicit
inverses in float64 over the remaining set), and the global allocation against every
candidate threshold.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from hf_snp.units.allocation import SiteCurve, allocate_global
from hf_snp.units.elimination import ordered_pivot_costs
from hf_snp.units.linalg import greedy_group_elimination, greedy_zca_elimination
from hf_snp.units.removal import RemovalPlan


def random_moment(n: int, seed: int, rank_boost: float = 0.3) -> torch.Tensor:
    """A well-conditioned SPD second moment with correlated units (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    x = x @ (torch.eye(n, dtype=torch.float64) + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64))
    x = x * torch.rand(n, generator=g, dtype=torch.float64).add(rank_boost)  # uneven scales
    return x.T @ x / x.shape[0]


def damped(moment: torch.Tensor, damping: float) -> torch.Tensor:
    """The documented damping: M + damping * mean(diag M) * I."""
    return moment + damping * moment.diagonal().mean() * torch.eye(moment.shape[0], dtype=moment.dtype)


def group_cost(moment: torch.Tensor, alive_units: list[int], units: list[int],
               weight: torch.Tensor | None = None) -> float:
    """tr(([M_SS^{-1}]_gg)^{-1}) over the remaining units S (or tr(W_g (.)^{-1} W_g^T)), by explicit inverses."""
    precision = torch.linalg.inv(moment[alive_units][:, alive_units])
    pos = [alive_units.index(u) for u in units]
    conditional = torch.linalg.inv(precision[pos][:, pos])  # covariance of g given S \ g
    if weight is None:
        return float(conditional.trace())
    w = weight[:, units]
    return float((w @ conditional @ w.T).trace())


def assert_greedy_steps(moment, removed, costs, schedule, group_size, weight=None, rtol=1e-7):
    """Each step removed a group of minimal brute-force cost among its candidates, and reported that cost."""
    num_groups = moment.shape[0] // group_size
    alive = list(range(num_groups))
    assert len(removed) == len(costs) == len(schedule)
    for step, (group, cost, pool) in enumerate(zip(removed, costs, schedule)):
        candidates = [g for g in pool if g in alive]
        assert group in candidates, f"step {step}: group {group} not a live candidate of {pool}"
        alive_units = [g * group_size + d for g in alive for d in range(group_size)]
        brute = {g: group_cost(moment, alive_units, list(range(g * group_size, (g + 1) * group_size)), weight)
                 for g in candidates}
        best = min(brute.values())
        assert brute[group] <= best * (1 + rtol) + 1e-12, \
            f"step {step}: chose {group} ({brute[group]}), best {best}: {brute}"
        assert cost == pytest.approx(brute[group], rel=1e-7, abs=1e-12), f"step {step}"
        alive.remove(group)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("n, num_remove", [(6, 2), (7, 7), (9, 4), (10, 8)])  # > 0.6 n takes the LAPACK path
@pytest.mark.parametrize("seed", range(4))
def test_greedy_zca_elimination_is_the_brute_force_greedy(n, num_remove, seed, damping):
    moment = random_moment(n, seed)
    removed, costs = greedy_zca_elimination(moment.clone(), num_remove, damping)
    assert len(set(removed)) == len(removed) == num_remove
    assert_greedy_steps(damped(moment, damping), removed, costs, [list(range(n))] * num_remove, 1)


@pytest.mark.parametrize("n, num_remove", [(6, 3), (8, 7)])
@pytest.mark.parametrize("seed", range(4))
def test_output_aware_zca_elimination_is_the_brute_force_greedy(n, num_remove, seed):
    """With energies w_i = ||W_:,i||^2 the step cost is w_i r_i (the weighted group formula with group size 1)."""
    moment = random_moment(n, seed)
    weight = torch.randn(5, n, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    removed, costs = greedy_zca_elimination(moment.clone(), num_remove, 1e-6, weight.pow(2).sum(0))
    assert_greedy_steps(damped(moment, 1e-6), removed, costs, [list(range(n))] * num_remove, 1, weight)


PLANS = [
    # (num_units, group_size, pools, rounds): MHA heads, GQA per_group (one pool per KV group), whole KV groups
    (12, 3, [[0, 1, 2, 3]], 3),
    (16, 2, [[0, 1, 2, 3], [4, 5, 6, 7]], 3),
    (18, 3, [[0, 1], [2, 3], [4, 5]], 2),
    (12, 2, [[0, 1, 2], [3, 4, 5]], 3),  # every head of every pool: the layer loses all heads
    (12, 4, [[0, 1, 2]], 2),
]


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("plan_args", PLANS, ids=lambda a: f"{a[0]}u-g{a[1]}-{len(a[2])}pools-r{a[3]}")
@pytest.mark.parametrize("seed", range(3))
def test_greedy_group_elimination_is_the_brute_force_greedy(plan_args, seed, damping):
    plan = RemovalPlan(*plan_args)
    moment = random_moment(plan.num_units, seed)
    removed, costs = greedy_group_elimination(moment.clone(), plan, damping)
    assert len(set(removed)) == len(removed)
    for step, (group, pool) in enumerate(zip(removed, plan.schedule)):
        assert group in pool, f"step {step} took {group} outside its pool {pool}"
    assert_greedy_steps(damped(moment, damping), removed, costs, plan.schedule, plan.group_size)


@pytest.mark.parametrize("plan_args", PLANS[:3], ids=lambda a: f"{a[0]}u-g{a[1]}-{len(a[2])}pools-r{a[3]}")
@pytest.mark.parametrize("seed", range(3))
def test_output_aware_group_elimination_is_the_brute_force_greedy(plan_args, seed):
    plan = RemovalPlan(*plan_args)
    moment = random_moment(plan.num_units, seed)
    weight = torch.randn(5, plan.num_units, generator=torch.Generator().manual_seed(200 + seed), dtype=torch.float64)
    removed, costs = greedy_group_elimination(moment.clone(), plan, 1e-6, weight)
    assert_greedy_steps(damped(moment, 1e-6), removed, costs, plan.schedule, plan.group_size, weight)


def brute_pivots(moment: torch.Tensor, keep_first: list[int], group_size: int) -> list[float]:
    """tr(Cov(g | groups before g)) = tr(M_gg - M_gB M_BB^{-1} M_Bg), by explicit inverses."""
    out = []
    for i, g in enumerate(keep_first):
        units = list(range(g * group_size, (g + 1) * group_size))
        before = [h * group_size + d for h in keep_first[:i] for d in range(group_size)]
        block = moment[units][:, units]
        if before:
            inverse = torch.linalg.inv(moment[before][:, before])
            block = block - moment[units][:, before] @ inverse @ moment[before][:, units]
        out.append(float(block.trace()))
    return out


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("group_size", [1, 2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_ordered_pivot_costs_are_the_schur_complement_pivots(group_size, seed, damping):
    num_groups = 5
    moment = random_moment(num_groups * group_size, seed)
    order = torch.randperm(num_groups, generator=torch.Generator().manual_seed(seed)).tolist()
    got = ordered_pivot_costs(moment.clone(), order, group_size, damping)
    assert got == pytest.approx(brute_pivots(damped(moment, damping), order, group_size), rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("plan_args", [(8, 1, [list(range(8))], 5)] + PLANS[:3], ids=str)
def test_greedy_costs_are_the_pivots_of_the_reversed_order(plan_args):
    """A greedy step's cost is the pivot of its group placed after every group still kept at that point."""
    plan = RemovalPlan(*plan_args)
    moment = random_moment(plan.num_units, 7)
    removed, costs = greedy_group_elimination(moment.clone(), plan, 1e-6)
    kept = [g for g in range(plan.num_groups) if g not in removed]
    pivots = ordered_pivot_costs(moment, kept + removed[::-1], plan.group_size, 1e-6)[len(kept):][::-1]
    assert costs == pytest.approx(pivots, rel=1e-7)


# --- global allocation against every threshold ---

def random_curves(rng: random.Random, num_sites: int) -> list[SiteCurve]:
    curves = []
    for layer in range(num_sites):
        max_steps = rng.randint(1, 5)
        # one decimal: ties within and across sites
        scores = sorted(round(rng.uniform(0, 1), 1) for _ in range(max_steps))
        step_params = [rng.randint(1, 6) for _ in range(max_steps)]
        params_removed = [0] + list(itertools.accumulate(step_params))
        allowed = [True] + [rng.random() < 0.7 for _ in range(max_steps)]
        curves.append(SiteCurve(layer, rng.choice(["mlp", "heads"]), scores, [1.0] * max_steps, params_removed, allowed,
                                list(range(max_steps, -1, -1)), params_removed[-1] + rng.randint(0, 5)))
    return curves


def steps_at(curve: SiteCurve, threshold: float) -> int:
    """Slow definition: the most allowed steps whose scores are all <= threshold."""
    return max(s for s in range(len(curve.params_removed))
               if curve.allowed[s] and all(x <= threshold for x in curve.scores[:s]))


def brute_force_allocation(curves: list[SiteCurve], target: float) -> tuple[dict, int]:
    """Every candidate threshold (no removal, or any score): the nearest removal to ``target``, fewer on ties."""
    options = []
    for threshold in [float("-inf")] + sorted({x for c in curves for x in c.scores}):
        steps = {c.key: steps_at(c, threshold) for c in curves}
        removed = sum(c.params_removed[steps[c.key]] for c in curves)
        options.append((abs(removed - target), removed, steps))
    distance, removed, steps = min(options, key=lambda o: o[:2])
    return steps, removed


@pytest.mark.parametrize("seed", range(60))
def test_allocate_global_is_the_exhaustive_best_and_monotone(seed):
    rng = random.Random(seed)
    curves = random_curves(rng, rng.choice([2, 3]))
    most = sum(c.params_removed[-1] for c in curves)
    previous = None
    for target in [x / 2 for x in range(0, 2 * most + 3)]:
        found = allocate_global(curves, target)
        steps, removed = brute_force_allocation(curves, target)
        assert found.removed_params == removed, f"target {target}: {found.removed_params} != exhaustive {removed}"
        assert found.steps == steps, f"target {target}"
        assert found.removed_params == sum(c.params_removed[found.steps[c.key]] for c in curves)
        assert all(c.allowed[found.steps[c.key]] for c in curves)
        if found.threshold is not None:  # the reported threshold gives these steps
            assert {c.key: steps_at(c, found.threshold) for c in curves} == found.steps
        else:
            assert removed == 0 or all(s == 0 for s in found.steps.values())
        if previous is not None:  # a larger budget never takes a step back anywhere
            assert found.removed_params >= previous.removed_params
            assert all(found.steps[k] >= previous.steps[k] for k in found.steps)
        previous = found
