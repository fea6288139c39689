"""Local search after SNP's greedy choice (swaps > 0, OSSCAR; docs/design.md §3.9): swap a removed unit or head with
a kept one of the same pool while the output error of the least-squares reconstruction falls."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import TINY, calibration_ids, prune_quiet
from scipy.linalg import hadamard

from hf_snp.config import PruneConfig
from hf_snp.methods import PruningMethod, SiteInputs, get_method
from hf_snp.units.linalg import greedy_group_elimination, greedy_zca_elimination, swap_search
from hf_snp.units.removal import RemovalPlan
from hf_snp.units.stats import SiteStatistics

DAMPING = 1e-6


def brute_error(moment, weight, plan, removed, damping=DAMPING):
    """E(P) = tr(W_P (M~_PP - M~_PK M~_KK^-1 M~_KP) W_P^T), M~ = M + damping * mean(diag M) * I, from the
    definition (a dense solve, nothing shared with hf_snp.units.linalg)."""
    n = moment.shape[0]
    matrix = moment + damping * moment.diagonal().mean() * torch.eye(n, dtype=moment.dtype)
    drop = sorted(u for g in removed for u in range(g * plan.group_size, (g + 1) * plan.group_size))
    keep = [u for u in range(n) if u not in set(drop)]
    schur = matrix[drop][:, drop]
    if keep:
        schur = schur - matrix[drop][:, keep] @ torch.linalg.solve(matrix[keep][:, keep], matrix[keep][:, drop])
    w_drop = weight[:, drop]
    return float(torch.trace(w_drop @ schur @ w_drop.T))


def random_site(n, out, seed, tokens=40):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=generator, dtype=torch.float64)
    x = x @ torch.randn(n, n, generator=generator, dtype=torch.float64)  # correlated units
    return x.T @ x / tokens, torch.randn(out, n, generator=generator, dtype=torch.float64)


def single_swaps(plan, removed):
    """Every removed set one within-pool swap away from ``removed``."""
    for pool in plan.pools:
        for back in (g for g in pool if g in removed):
            for out in (g for g in pool if g not in removed):
                yield [out if g == back else g for g in removed]


def per_pool(plan, removed):
    return [sum(g in pool for g in removed) for pool in plan.pools]


@pytest.mark.parametrize("seed", range(6))
def test_swaps_reach_a_local_optimum_no_worse_than_greedy(seed):
    """8 units, 3 removed: after the swaps E is at most the greedy ZCA's, both as reported and by brute force, and
    no single swap lowers it further."""
    moment, weight = random_site(8, 5, seed)
    plan = RemovalPlan(8, 1, [list(range(8))], 3)
    greedy, _ = greedy_zca_elimination(moment, 3, DAMPING)
    removed, swaps, before, after = swap_search(moment, weight, plan, greedy, 50, DAMPING)
    assert before == pytest.approx(brute_error(moment, weight, plan, greedy), rel=1e-9)
    assert after == pytest.approx(brute_error(moment, weight, plan, removed), rel=1e-9)
    assert after <= before and len(set(removed)) == 3
    assert len(set(removed) - set(greedy)) <= swaps < 50  # stopped because no swap helps, not by the cap
    for neighbour in single_swaps(plan, removed):
        assert brute_error(moment, weight, plan, neighbour) >= after * (1 - 1e-9), neighbour


@pytest.mark.parametrize("seed", range(4))
def test_swap_cap_is_respected(seed):
    moment, weight = random_site(8, 5, seed + 10)
    plan = RemovalPlan(8, 1, [list(range(8))], 3)
    greedy, _ = greedy_zca_elimination(moment, 3, DAMPING)
    removed, swaps, before, after = swap_search(moment, weight, plan, greedy, 1, DAMPING)
    assert swaps <= 1 and len(set(removed) - set(greedy)) == swaps
    if swaps:  # the one swap made is the best single swap
        best = min(brute_error(moment, weight, plan, s) for s in single_swaps(plan, greedy))
        assert after == pytest.approx(best, rel=1e-9) and after < before


def test_no_swap_when_greedy_is_optimal_or_nothing_is_kept():
    moment, weight = random_site(6, 3, 0)
    plan = RemovalPlan(6, 1, [list(range(6))], 6)
    assert swap_search(moment, weight, plan, list(range(6)), 5, DAMPING)[1] == 0
    plan = RemovalPlan(6, 1, [list(range(6))], 2)
    best = min(itertools.combinations(range(6), 2), key=lambda c: brute_error(moment, weight, plan, c))
    removed, swaps, before, after = swap_search(moment, weight, plan, list(best), 5, DAMPING)
    assert swaps == 0 and removed == list(best) and before == after


def planted_site():
    """8 independent units (Hadamard tokens: the covariance is exactly diag(v)) with variances v = 1..8 feeding
    columns of squared norm 100 (units 0-2) or 1 (units 3-7). ZCA removes the least variance, units 0, 1, 2
    (E = 100 + 200 + 300); the output error is least without units 3, 4, 5 (E = 4 + 5 + 6)."""
    variance = torch.arange(1, 9, dtype=torch.float64)
    tokens = torch.from_numpy(hadamard(16)[:, 1:9]).double() * variance.sqrt()
    stats = SiteStatistics("planted", 8, torch.device("cpu"))
    stats.update(tokens)
    weight = torch.diag(torch.tensor([10.0, 10, 10, 1, 1, 1, 1, 1], dtype=torch.float64))
    return SiteInputs(stats, RemovalPlan(8, 1, [list(range(8))], 3), False, weight, 0)


def test_planted_case_swaps_find_the_exact_optimum():
    site = planted_site()
    moment = site.stats.moments(centered=False)[0]
    errors = {c: brute_error(moment, site.consumer_weight, site.plan, c) for c in itertools.combinations(range(8), 3)}
    optimum = min(errors, key=errors.get)
    assert optimum == (3, 4, 5) and errors[optimum] == pytest.approx(15, rel=1e-4)
    snp = get_method("snp")
    greedy = snp.decide(site, PruneConfig(ordering="zca", ridge="fixed"))
    assert greedy.drop.tolist() == [0, 1, 2] and greedy.swaps is None  # ZCA: the least variance goes
    decision = snp.decide(site, PruneConfig(ordering="zca", ridge="fixed", swaps=8))
    assert decision.drop.tolist() == [3, 4, 5]
    assert decision.swaps == 3  # each swap trades the worst removed unit for the cheapest kept one
    assert decision.swap_errors == pytest.approx((errors[(0, 1, 2)], errors[optimum]), rel=1e-9)
    capped = snp.decide(site, PruneConfig(ordering="zca", ridge="fixed", swaps=2))
    assert capped.swaps == 2 and capped.drop.tolist() == [0, 3, 4]
    assert decision.coef is not None and decision.coef.shape == (3, 5)  # reconstructed from the new kept set


def site_inputs(n, group_size, pools, rounds, seed, bias=True):
    moment, weight = random_site(n, 6, seed, tokens=4 * n)
    stats = SiteStatistics("random", n, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    stats.update(torch.randn(4 * n, n, generator=generator, dtype=torch.float64) @ moment)
    return SiteInputs(stats, RemovalPlan(n, group_size, pools, rounds), bias, weight, seed)


@pytest.mark.parametrize("ordering", ["zca", "obs", "output_aware", "natural", "random"])
@pytest.mark.parametrize("group_size, pools, rounds", [(1, [list(range(12))], 4), (3, [[0, 1], [2, 3]], 1),
                                                       (2, [list(range(6))], 2)])
def test_swaps_zero_is_bit_identical_to_the_plain_decision(ordering, group_size, pools, rounds):
    site = site_inputs(12, group_size, pools, rounds, seed=3)
    config = PruneConfig(ordering=ordering, swaps=0)
    snp = get_method("snp")
    got, plain = snp.decide(site, config), PruningMethod.decide(snp, site, config)
    assert got.removed_groups == plain.removed_groups and got.swaps is None and got.swap_errors is None
    for name in ("keep", "drop", "coef", "shift"):
        assert torch.equal(getattr(got, name), getattr(plain, name)), name


def test_swaps_zero_never_runs_the_search(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("swap_search ran with swaps=0")

    monkeypatch.setattr("hf_snp.methods.snp.swap_search", refuse)
    prune_quiet(TINY["llama"](), sparsity=0.3, targets=("mlp", "heads"))


def test_obs_greedy_error_is_the_sum_of_its_step_costs():
    """E before the swaps is the output error that obs's step costs add up to (the same damped statistics)."""
    site = site_inputs(10, 1, [list(range(10))], 4, seed=5)
    snp = get_method("snp")
    _, costs = snp.order(site, PruneConfig(ordering="obs"))
    decision = snp.decide(site, PruneConfig(ordering="obs", swaps=3))
    assert decision.swap_errors[0] == pytest.approx(sum(costs), rel=1e-8)
    assert decision.swap_errors[1] <= decision.swap_errors[0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gqa", ["per_group", "kv_groups"])
def test_gqa_head_swaps_stay_within_pools(seed, gqa):
    """Heads of 3 units; per_group: 3 KV groups of 3 query heads (one pool each), 2 rounds; kv_groups: one pool of
    3 KV groups of 9 units, 1 round. Swaps keep the count removed from every pool, end no worse than greedy and at
    a local optimum among within-pool swaps."""
    if gqa == "per_group":
        plan = RemovalPlan(27, 3, [[0, 1, 2], [3, 4, 5], [6, 7, 8]], 2)
    else:
        plan = RemovalPlan(27, 9, [[0, 1, 2]], 1)
    moment, weight = random_site(27, 6, seed + 20, tokens=80)
    greedy, _ = greedy_group_elimination(moment, plan, DAMPING)
    removed, swaps, before, after = swap_search(moment, weight, plan, greedy, 50, DAMPING)
    assert per_pool(plan, removed) == per_pool(plan, greedy) == [plan.rounds] * len(plan.pools)
    assert [next(i for i, p in enumerate(plan.pools) if g in p) for g in removed] == \
        [next(i for i, p in enumerate(plan.pools) if g in p) for g in greedy]  # the schedule's pool order holds
    assert after == pytest.approx(brute_error(moment, weight, plan, removed), rel=1e-9) and after <= before
    for neighbour in single_swaps(plan, removed):
        assert brute_error(moment, weight, plan, neighbour) >= after * (1 - 1e-9), neighbour


def test_gqa_swaps_happen_somewhere():
    """Not vacuous: on these random head sites the greedy group order is improved by at least one swap."""
    plan = RemovalPlan(27, 3, [[0, 1, 2], [3, 4, 5], [6, 7, 8]], 1)
    made = []
    for seed in range(6):
        moment, weight = random_site(27, 6, seed + 20, tokens=80)
        greedy, _ = greedy_group_elimination(moment, plan, DAMPING)
        made.append(swap_search(moment, weight, plan, greedy, 50, DAMPING)[1])
    assert sum(made) > 0, made


def layer0_statistics(model, module_of, ids, batch_size=4):
    """The statistics layer 0's consumer sees during pruning (the dense model's, since nothing is cut before it),
    accumulated per calibration batch as the engine does."""
    consumer = module_of(model.model.layers[0])
    stats = SiteStatistics("layer0", consumer.in_features, torch.device("cpu"))
    handle = consumer.register_forward_pre_hook(lambda module, args: stats.update(args[0]))
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            model(ids[start:start + batch_size], use_cache=False)
    handle.remove()
    return stats, consumer.weight.detach().double().clone()


def kept_rows(dense, pruned, size):
    dense_rows = dense.weight.reshape(-1, size * dense.in_features)
    return [next(g for g in range(len(dense_rows)) if torch.equal(dense_rows[g], row))
            for row in pruned.weight.reshape(-1, size * pruned.in_features)]


def test_end_to_end_llama_swaps_lower_the_first_layers_output_error():
    """Tiny Llama, MLP and heads, 30%: with swaps=4 each of layer 0's sites (the only ones whose statistics are
    the same in both runs) has an output error E(P) on its calibration statistics no larger than with swaps=0, and
    the consumer's actual output error (its reconstructed weights against the dense ones) follows."""
    dense = TINY["llama"]()
    ids = calibration_ids()
    runs = {swaps: prune_quiet(copy.deepcopy(dense), sparsity=0.3, targets=("mlp", "heads"), swaps=swaps,
                                     ordering="zca", ridge="fixed")
            for swaps in (0, 4)}
    assert runs[4].report["params_after"] == runs[0].report["params_after"]
    assert runs[4].report["swaps"] == 4
    changed = 0
    sites = {"mlp": (lambda layer: layer.mlp.down_proj, lambda layer: layer.mlp.up_proj, 1),
             "heads": (lambda layer: layer.self_attn.o_proj, lambda layer: layer.self_attn.q_proj, 8)}
    for consumer_of, producer_of, size in sites.values():
        stats, weight = layer0_statistics(dense, consumer_of, ids)
        moment = stats.moments(centered=False)[0]  # Llama's consumers have no bias: SNP's raw second moment
        plan = RemovalPlan(weight.shape[1], size, [], 0)
        errors, actual, kept_sets = {}, {}, {}
        for swaps, result in runs.items():
            layer = result.model.model.layers[0]
            kept = kept_rows(producer_of(dense.model.layers[0]), producer_of(layer), size)
            removed = [g for g in range(weight.shape[1] // size) if g not in kept]
            errors[swaps] = brute_error(moment, weight, plan, removed)
            keep = [g * size + d for g in kept for d in range(size)]
            residual = weight.clone()
            residual[:, keep] -= consumer_of(layer).weight.detach().double()
            actual[swaps] = float(torch.trace(residual @ moment @ residual.T))
            kept_sets[swaps] = kept
        assert errors[4] <= errors[0] * (1 + 1e-9)
        assert actual[4] <= actual[0] * (1 + 1e-5)
        changed += kept_sets[4] != kept_sets[0]
    assert changed, "no swap in layer 0: the comparison would be vacuous"


@pytest.mark.parametrize("options, message", [
    ({"swaps": -1}, "non-negative integer"),
    ({"swaps": 1.5}, "non-negative integer"),
    ({"swaps": True}, "non-negative integer"),
    ({"swaps": 2, "method": "vbp"}, "method='snp'"),
    ({"swaps": 2, "method": "flap"}, "method='snp'"),
    ({"swaps": 2, "reconstruct": False}, "reconstruct=True"),
])
def test_bad_swaps_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**options).validate()


def test_swaps_combine_with_orderings_and_heldout_ridge():
    PruneConfig(swaps=3, ordering="obs", ridge="heldout").validate()
    PruneConfig(swaps=3, reconstruction_target="dense").validate()
    assert PruneConfig().swaps == 0
