"""Model-aware SNP (issue 15, items 1 and 2): the structured-OBS ordering (``ordering="obs"``, docs/design.md §3.5)
and the ridge chosen on held-out calibration tokens (``ridge="heldout"``, §3.8)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, make_scaled_copies, prune_quiet, sparsity_removing, tiny_llama, tiny_opt
from test_moe import EXPERTS, tiny_moe

from hf_snp.config import PruneConfig
from hf_snp.units.linalg import (
    greedy_group_elimination,
    greedy_obs_elimination,
    greedy_zca_elimination,
    least_squares_map,
)
from hf_snp.units.removal import RemovalPlan, split
from hf_snp.units.ridge import _errors_and_bounds, choose_ridge, heldout_errors, ridge_grid
from hf_snp.units.stats import SiteStatistics

CPU = torch.device("cpu")


def random_moment(n: int, seed: int) -> torch.Tensor:
    """A well-conditioned SPD second moment with correlated, unevenly scaled units (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    x = x @ (torch.eye(n, dtype=torch.float64) + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64))
    x = x * torch.rand(n, generator=g, dtype=torch.float64).add(0.3)
    return x.T @ x / x.shape[0]


def random_weight(out: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(out, n, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)


def reconstructed_error(moment: torch.Tensor, weight: torch.Tensor, removed_units: list[int]) -> float:
    """tr(E M E^T), E = W - [W'_K on the kept columns]: the consumer-output error over the moments once SNP's
    least-squares map (undamped) is folded into W (``Decision.fold``)."""
    n = moment.shape[0]
    keep, drop = split(n, removed_units, CPU)
    if len(keep) == 0:
        return float((weight @ moment @ weight.T).trace())
    decision = RemovalPlan(n, 1, [list(range(n))], 0).decision([], CPU)
    decision.keep, decision.drop = keep, drop
    if len(drop):
        decision.coef = least_squares_map(moment, keep, drop, 0.0)
    kept_columns, _ = decision.fold(weight)
    residual = weight.clone()
    residual[:, keep] -= kept_columns
    return float((residual @ moment @ residual.T).trace())


# --- ordering="obs": structured OBS ------------------------------------------------------------------------------

@pytest.mark.parametrize("n, out, num_remove", [(7, 5, 7), (12, 4, 9), (10, 16, 6)])
@pytest.mark.parametrize("seed", range(3))
def test_obs_step_costs_add_up_to_the_reconstructed_output_error(n, out, num_remove, seed):
    """After every step, the sum of the step costs is the output error of the least-squares map on the rest."""
    moment, weight = random_moment(n, seed), random_weight(out, n, seed)
    removed, costs = greedy_obs_elimination(moment.clone(), weight, num_remove, 0.0)
    assert len(set(removed)) == len(removed) == num_remove
    for step in range(1, num_remove + 1):
        exact = reconstructed_error(moment, weight, removed[:step])
        assert sum(costs[:step]) == pytest.approx(exact, rel=1e-8, abs=1e-10), f"step {step}"


@pytest.mark.parametrize("n, num_remove", [(5, 4), (6, 3), (7, 5)])
@pytest.mark.parametrize("seed", range(4))
def test_each_obs_step_is_the_brute_force_best_next_unit(n, num_remove, seed):
    """Every step removes the unit whose removal (with those before it) leaves the least reconstructed output
    error, by enumerating the candidates; so the first step (k = 1) is the optimal single removal."""
    moment, weight = random_moment(n, seed), random_weight(3, n, seed)
    removed, costs = greedy_obs_elimination(moment.clone(), weight, num_remove, 0.0)
    single = {q: reconstructed_error(moment, weight, [q]) for q in range(n)}
    assert single[removed[0]] == pytest.approx(min(single.values()), rel=1e-9)
    for step in range(num_remove):
        before = removed[:step]
        brute = {q: reconstructed_error(moment, weight, before + [q]) for q in range(n) if q not in before}
        assert brute[removed[step]] <= min(brute.values()) * (1 + 1e-9) + 1e-12, f"step {step}: {brute}"


@pytest.mark.parametrize("seed", range(6))
def test_obs_single_removal_is_optimal_where_zca_need_not_be(seed):
    """k = 1: OBS's unit has the least reconstructed error of all n; ZCA's (least unique variance, weight-blind)
    never does better."""
    n = 6
    moment, weight = random_moment(n, seed), random_weight(4, n, seed)
    (obs,), _ = greedy_obs_elimination(moment.clone(), weight, 1, 0.0)
    (zca,), _ = greedy_zca_elimination(moment.clone(), 1, 0.0)
    errors = [reconstructed_error(moment, weight, [q]) for q in range(n)]
    assert errors[obs] == pytest.approx(min(errors), rel=1e-9)
    assert errors[obs] <= errors[zca] * (1 + 1e-9)


PLANS = [  # (num_units, group_size, pools, rounds): MHA heads, GQA per_group, whole KV groups, every head
    (12, 3, [[0, 1, 2, 3]], 3),
    (16, 2, [[0, 1, 2, 3], [4, 5, 6, 7]], 3),
    (18, 3, [[0, 1], [2, 3], [4, 5]], 2),
    (12, 2, [[0, 1, 2], [3, 4, 5]], 3),
]


@pytest.mark.parametrize("plan_args", PLANS, ids=lambda a: f"{a[0]}u-g{a[1]}-{len(a[2])}pools-r{a[3]}")
@pytest.mark.parametrize("seed", range(3))
def test_obs_group_steps_add_up_and_each_is_the_brute_force_best(plan_args, seed):
    plan = RemovalPlan(*plan_args)
    moment, weight = random_moment(plan.num_units, seed), random_weight(5, plan.num_units, seed)
    removed, costs = greedy_group_elimination(moment.clone(), plan, 0.0, weight, update_weight=True)
    assert len(set(removed)) == len(removed) == len(plan.schedule)

    def error(groups: list[int]) -> float:
        return reconstructed_error(moment, weight, plan.units(groups).tolist())

    for step, pool in enumerate(plan.schedule):
        before = removed[:step]
        assert sum(costs[:step + 1]) == pytest.approx(error(removed[:step + 1]), rel=1e-8, abs=1e-10)
        brute = {g: error(before + [g]) for g in pool if g not in before}
        assert removed[step] in brute, f"step {step} left its pool {pool}"
        assert brute[removed[step]] <= min(brute.values()) * (1 + 1e-9) + 1e-12, f"step {step}: {brute}"


def test_obs_differs_from_output_aware_only_after_the_first_step():
    """Output-aware keeps W fixed; OBS scores with the reconstruction so far. Their first steps agree, and on some
    random instance their orders part (the update is not a no-op)."""
    parted = False
    for seed in range(10):
        moment, weight = random_moment(9, seed), random_weight(3, 9, seed)
        obs, _ = greedy_obs_elimination(moment.clone(), weight, 6, 0.0)
        aware, _ = greedy_zca_elimination(moment.clone(), 6, 0.0, weight.pow(2).sum(0))
        assert obs[0] == aware[0]
        parted = parted or obs != aware
    assert parted


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_obs_prunes_exact_copies_without_changing_the_model(make):
    """With scaled copies of MLP neurons, OBS removes one of each pair at zero output error (raw moments on
    Llama, centred on OPT): the pruned model's logits are the dense ones."""
    model = make()
    make_scaled_copies(model, 12)
    reference = logits(model)
    result = prune_quiet(copy.deepcopy(model), sparsity=sparsity_removing(model, 12), ordering="obs")
    assert [record["mlp_width"] for record in result.report["layers"]] == [36] * 4
    assert (logits(result.model) - reference).abs().max() < 1e-4


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_obs_runs_on_heads_and_mlp(allocation):
    model = tiny_llama()
    result = prune_quiet(model, sparsity=0.3, targets=("mlp", "heads"), ordering="obs", allocation=allocation)
    assert result.report["params_after"] < result.report["params_before"]
    assert torch.isfinite(logits(result.model)).all()


# --- ridge="heldout": per-fold statistics --------------------------------------------------------------------------

def batches_and_mask(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g)
    out = []
    for b in range(4):
        h = torch.randn(3, 7, n, generator=g) @ mix + 3.0
        mask = None if b % 2 else torch.rand(21, generator=g) > 0.3
        out.append((h, mask))
    return out


def fold_tokens(batches, folds: int) -> list[torch.Tensor]:
    """The documented split: each batch's kept tokens in ``folds`` contiguous parts, part f to fold f."""
    parts = [[] for _ in range(folds)]
    for h, mask in batches:
        rows = h.reshape(-1, h.shape[-1]).double()
        rows = rows if mask is None else rows[mask]
        for fold, part in enumerate(torch.tensor_split(rows, folds)):
            parts[fold].append(part)
    return [torch.cat(p) for p in parts]


def feed(stats: SiteStatistics, batches) -> SiteStatistics:
    for h, mask in batches:
        stats.token_mask = mask
        stats.update(h)
    return stats


@pytest.mark.parametrize("folds", [2, 3, 4])
def test_fold_grams_add_up_to_the_full_gram(folds):
    n = 200  # two row panels: the mirrored lower triangle is checked as well
    batches = batches_and_mask(n, folds)
    split_stats, whole = feed(SiteStatistics("s", n, CPU, folds), batches), feed(SiteStatistics("s", n, CPU), batches)
    assert split_stats.count == whole.count == sum(split_stats.fold_counts)
    total = torch.stack(split_stats.fold_grams).double().sum(0)
    torch.testing.assert_close(total, whole.fold_grams[0].double(), rtol=1e-5, atol=1e-3)
    def close(got, want):  # float32 sums in another order: to 1e-6 of the largest entry
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))

    for centered in (False, True):
        for got, want in zip(split_stats.moments(centered), whole.moments(centered)):
            close(got, want)
    for fold, tokens in enumerate(fold_tokens(batches, folds)):
        assert split_stats.fold_counts[fold] == tokens.shape[0]
        sigma, mu = split_stats.moments(True, [fold])
        close(mu, tokens.mean(0))
        close(sigma, torch.cov(tokens.T, correction=0))


def direct_heldout_error(folds: list[torch.Tensor], centered: bool, weight, keep, drop, ridge: float) -> float:
    """From the activations: fit the map (with intercept when centred) on every fold's tokens but the last, and
    return the mean squared consumer-output error of the removed units on the last fold's tokens."""
    held, train = folds[-1], torch.cat(folds[:-1])
    mean = train.mean(0) if centered else torch.zeros(train.shape[1], dtype=train.dtype)
    x = train - mean
    moment = x.T @ x / train.shape[0]
    kept = moment[keep][:, keep]
    b = moment[drop][:, keep] @ torch.linalg.inv(kept + ridge * kept.diagonal().mean() * torch.eye(len(keep),
                                                                                                    dtype=x.dtype))
    y = held - mean
    return float(((y[:, drop] - y[:, keep] @ b.T) @ weight[:, drop].T).pow(2).sum()) / held.shape[0]


@pytest.mark.parametrize("folds", [2, 3])
@pytest.mark.parametrize("centered", [False, True])
def test_closed_form_heldout_error_is_the_direct_one(folds, centered):
    n = 10
    batches = batches_and_mask(n, 7)
    stats = feed(SiteStatistics("s", n, CPU, folds), batches)
    keep, drop = torch.tensor([0, 1, 3, 4, 6, 8, 9]), torch.tensor([2, 5, 7])
    weight = random_weight(4, n, 0)
    grid = [0.0, 1e-3, 1e-1]
    got = heldout_errors(stats, centered, weight, keep, drop, grid)
    want = [direct_heldout_error(fold_tokens(batches, folds), centered, weight, keep, drop, r) for r in grid]
    assert got.tolist() == pytest.approx(want, rel=1e-5)


def planted(seed: int, tokens: int) -> torch.Tensor:
    """45 units, all noisy copies of one signal (noise 0.5); the last 5 will be removed."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(tokens, 1, generator=g, dtype=torch.float64)
    return signal + 0.5 * torch.randn(tokens, 45, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_heldout_ridge_beats_the_damping_on_a_tiny_calibration(centered, seed):
    """Fewer calibration tokens (30) than units (45): the least-damped map fits the removed units' noise from the
    kept units' noise. The held-out choice is a larger λ, with a lower held-out error than λ = damping, and its map
    (refitted on all tokens) predicts fresh tokens better."""
    damping = 1e-6
    calibration = planted(seed, 30)
    stats = SiteStatistics("s", 45, CPU, folds=2)
    stats.update(calibration)
    keep, drop = torch.arange(40), torch.arange(40, 45)
    weight = random_weight(8, 45, seed)
    grid = ridge_grid(damping)
    errors = heldout_errors(stats, centered, weight, keep, drop, grid)
    chosen = choose_ridge(stats, centered, weight, keep, drop, damping)
    assert chosen > min(grid) and chosen in grid
    assert errors[grid.index(chosen)] < errors[grid.index(damping)]

    moment, mean = stats.moments(centered)
    fresh = planted(100 + seed, 4000) - (mean if centered else 0)

    def fresh_error(ridge: float) -> float:
        b = least_squares_map(moment, keep, drop, ridge)
        return float(((fresh[:, drop] - fresh[:, keep] @ b.T) @ weight[:, drop].T).pow(2).mean(0).sum())

    assert fresh_error(chosen) < fresh_error(damping)


def correlated_stats(n: int, tokens: int, seed: int, folds: int, spread: float) -> SiteStatistics:
    """Units mixing a few signals, with scales spread over ``spread`` decades (ill-conditioned for large spreads)."""
    g = torch.Generator().manual_seed(seed)
    signals = torch.randn(tokens, n // 4, generator=g) @ torch.randn(n // 4, n, generator=g)
    h = (signals + 0.3 * torch.randn(tokens, n, generator=g)) * torch.logspace(0, spread, n)[torch.randperm(n,
                                                                                                         generator=g)]
    stats = SiteStatistics("s", n, CPU, folds)
    for part in h.split(64):
        stats.update(part + 1.5)
    return stats


@pytest.mark.parametrize("spread", [0.0, 2.0, 4.0])
@pytest.mark.parametrize("folds", [2, 3])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_float32_screening_chooses_the_float64_ridge(spread, folds, centered, seed):
    """choose_ridge computes the held-out errors in float32 with bounds (float64 again when they leave the choice
    open): its λ is always the float64 argmin, on well- and ill-conditioned sites (unit scales spread over 4
    decades, where float32 alone picks another λ); each float32 error is within its bound of the float64 one."""
    n = 96
    stats = correlated_stats(n, 600, seed, folds, spread)
    removed = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 3]
    keep, drop = split(n, removed, CPU)
    weight = random_weight(24, n, seed)
    grid = ridge_grid(1e-6)
    exact = heldout_errors(stats, centered, weight, keep, drop, grid)
    assert choose_ridge(stats, centered, weight, keep, drop, 1e-6) == grid[int(exact.argmin())]
    screened, bounds = _errors_and_bounds(stats, centered, weight, keep, drop, grid, torch.float32)
    assert bool(((screened - exact).abs() <= bounds).all())


def test_a_close_call_is_decided_in_float64(monkeypatch):
    """When the float32 errors of two λ are closer than their bounds, the choice is the float64 one: here the float32
    errors are made to favour the wrong λ by less than its bound."""
    import hf_snp.units.ridge as ridge_module

    stats = correlated_stats(48, 400, 0, 2, 1.0)
    keep, drop = split(48, list(range(0, 48, 3)), CPU)
    weight = random_weight(8, 48, 0)
    grid = ridge_grid(1e-6)
    exact = heldout_errors(stats, True, weight, keep, drop, grid)
    best, runner_up = exact.topk(2, largest=False).indices.tolist()
    original = ridge_module._errors_and_bounds

    def skewed(*args):
        errors, bounds = original(*args)
        if args[-1] == torch.float32:
            errors = errors.clone()
            bounds = bounds.clamp_min(1e-3 * float(errors[best]))
            errors[runner_up] = errors[best] - bounds[best] / 2
        return errors, bounds
    monkeypatch.setattr(ridge_module, "_errors_and_bounds", skewed)
    assert choose_ridge(stats, True, weight, keep, drop, 1e-6) == grid[best]


def test_ridge_grid_contains_the_damping():
    assert ridge_grid(5e-5) == sorted(ridge_grid(5e-5)) and 5e-5 in ridge_grid(5e-5)


# --- ridge="heldout" in a run -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, folds", [(tiny_llama, 2), (tiny_opt, 3)], ids=["llama", "opt"])
def test_heldout_ridge_is_reported_per_site(make, folds):
    model = make()
    result = prune_quiet(model, sparsity=0.3, targets=("mlp", "heads"), ridge="heldout", ridge_folds=folds,
                         gqa_mode="kv_groups")
    grid = ridge_grid(1e-6)
    for record in result.report["layers"]:
        assert record["mlp_ridge"] in grid
        if record["num_heads"] not in (0, record["num_heads_before"]):
            assert record["heads_ridge"] in grid
    assert any("heads_ridge" in record for record in result.report["layers"])
    assert torch.isfinite(logits(result.model)).all()


def test_heldout_ridge_and_obs_on_routed_experts():
    """Each routed expert's statistics are split into folds too; the records name every expert's λ."""
    result = prune_quiet(tiny_moe("qwen2_moe"), sparsity=0.3, ridge="heldout", ordering="obs")
    grid = ridge_grid(1e-6)
    for record in result.report["layers"]:
        assert record["expert_width"] < record["expert_width_before"]
        assert all(record[f"expert_{e}_ridge"] in grid for e in range(EXPERTS))
        assert record["shared_expert_ridge"] in grid


def test_heldout_ridge_of_the_first_layer_is_the_one_its_statistics_give():
    """Layer 0's MLP sees the dense model's units: the λ reported is choose_ridge on their fold statistics with
    the kept set the run chose."""
    model = tiny_llama()
    ids = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(1))
    seen = []
    consumer = model.model.layers[0].mlp.down_proj
    handle = consumer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for start in range(0, 8, 4):
            model(ids[start:start + 4])
    handle.remove()
    weight = consumer.weight.detach().clone()
    result = prune_quiet(copy.deepcopy(model), sparsity=0.3, ridge="heldout", calibration=ids)
    stats = SiteStatistics("s", 48, CPU, folds=2)
    for units in seen:
        stats.update(units)
    removed, _ = greedy_zca_elimination(stats.moments(False)[0], 48 - result.report["layers"][0]["mlp_width"], 1e-6)
    keep, drop = split(48, removed, CPU)
    assert result.report["layers"][0]["mlp_ridge"] == choose_ridge(stats, False, weight, keep, drop, 1e-6)


def test_fixed_ridge_reports_no_ridge_and_keeps_the_default():
    result = prune_quiet(tiny_llama(), sparsity=0.3, ridge="fixed")
    assert all("mlp_ridge" not in record for record in result.report["layers"])


@pytest.mark.parametrize("options, message", [
    ({"ridge": "heldout", "method": "vbp"}, "method='snp'"),
    ({"ridge": "heldout", "reconstruct": False}, "reconstruct=True"),
    ({"ridge": "heldout", "reconstruction_target": "dense"}, "reconstruction_target='dense'"),
    ({"ridge_folds": 1}, "ridge_folds"),
    ({"ridge_folds": 5}, "ridge_folds"),
    ({"ridge_folds": True}, "ridge_folds"),
    ({"ridge": "cv"}, "unknown ridge"),
    ({"ordering": "obs", "method": "flap"}, "SNP ablation"),
])
def test_bad_combinations_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**options).validate()


def test_obs_and_heldout_together_are_accepted():
    PruneConfig(ordering="obs", ridge="heldout", ridge_folds=4).validate()
    assert PruneConfig().resolved_ridge == "heldout" and PruneConfig().resolved_ordering == "obs"
    assert PruneConfig(method="vbp").resolved_ridge == "fixed"
    assert PruneConfig(reconstruct=False).resolved_ordering == "zca"
