"""allocation='output_error' (issue 15, item 5; docs/design.md §6.4): each step's cost is the consumer-output error
it adds, relative to the residual-stream energy entering its block, per parameter removed; one threshold on those
costs, each site held within ``allocation_band`` of its uniform fraction. 'cumulative_variance' ('global') stays the
paper's criterion."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from conftest import (
    TINY,
    TINY_VISION,
    calibration_ids,
    image_logits,
    logits,
    pixel_values,
    prune_quiet,
    sites_of,
    tiny_llama,
)
from test_obs_ridge import random_moment, random_weight, reconstructed_error
from test_save_reload import BLOCK_HF_SNP, reload_in_fresh_process
from transformers import LlamaConfig, LlamaForCausalLM

import hf_snp
from hf_snp.config import PruneConfig
from hf_snp.methods import SiteInputs, get_method
from hf_snp.passes.block_inputs import BlockInput, residual_energy
from hf_snp.passes.engine import StreamingEngine
from hf_snp.units.allocation import SiteCurve, WidthRules, allocate_global, convex_scores, nearest_steps
from hf_snp.units.linalg import greedy_group_elimination, greedy_obs_elimination, unreconstructed_errors
from hf_snp.units.removal import RemovalPlan
from hf_snp.units.stats import SiteStatistics

MH = ("mlp", "heads")


def record_curves(monkeypatch) -> list:
    """Every list of curves the dense statistics pass returns, in order."""
    seen, original = [], StreamingEngine.collect_curves
    monkeypatch.setattr(StreamingEngine, "collect_curves",
                        lambda self, calib, rules: seen.append(original(self, calib, rules)) or seen[-1])
    return seen


def widths(result) -> list[tuple]:
    return [(layer.get("mlp_width"), layer.get("num_heads")) for layer in result.report["layers"]]


def site_params(model, targets=MH) -> dict[tuple[int, str], object]:
    return {(site.index, site.kind): site for target in targets for site in sites_of(model, target)}


# --- (a) band 0 is uniform -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("options", [dict(sparsity=0.3), dict(sparsity=0.45, round_to={"mlp": 8, "heads": 1}),
                                     dict(sparsity_per_target={"mlp": 0.4, "heads": 0.2})])
def test_band_zero_gives_the_uniform_widths(family, options):
    model = TINY[family]()
    uniform = prune_quiet(copy.deepcopy(model), targets=MH, allocation="uniform", **options)
    banded = prune_quiet(copy.deepcopy(model), targets=MH, allocation="output_error", allocation_band=0.0, **options)
    assert widths(banded) == widths(uniform)
    assert banded.report["params_removed"] == uniform.report["params_removed"]
    sites = banded.report["allocation"]["sites"]
    assert all(entry["band_steps"][0] == entry["band_steps"][1] == entry["steps"] for entry in sites.values())


def test_band_zero_matches_nearest_steps_under_the_default_multiple():
    """Sites of 128 neurons or more keep a multiple of 8 (rounded up): the band's ends are uniform's own choice."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=160, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    rules = WidthRules.build(None, {"mlp": 20})
    for site in sites_of(model, "mlp") + sites_of(model, "heads"):
        curve = SiteCurve.from_site(site, None, [1.0] * site.curve_steps(), rules)
        for fraction in [i / 40 for i in range(40)]:
            uniform = nearest_steps(site, fraction * site.num_params(), rules)
            assert curve.nearest_steps(fraction * site.num_params()) == uniform
            band = curve.banded(fraction, 0.0)
            assert band.min_steps == band.top == uniform
            assert all(band.steps_at(t) == uniform for t in (float("-inf"), 0.0, 1.0, float("inf")))


# --- (b) the band and the budget -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("targets", [("mlp",), MH])
@pytest.mark.parametrize("band", [0.05, 0.1, 0.3])
def test_every_site_stays_in_its_band_and_the_budget_is_met(family, targets, band, monkeypatch):
    model = TINY[family]()
    sites = site_params(model, targets)
    total = sum(site.num_params() for site in sites.values())
    largest = max(site.params_per_step() for site in sites.values())
    for sparsity in (0.2, 0.4):
        result = prune_quiet(copy.deepcopy(model), targets=targets, sparsity=sparsity, allocation="output_error",
                             allocation_band=band)
        allocation = result.report["allocation"]
        assert allocation["mode"] == "output_error" and allocation["band"] == band
        removed = 0
        for key, site in sites.items():
            entry = allocation["sites"][f"{key[0]}.{key[1]}"]
            low, high = entry["band_steps"]
            assert low <= entry["steps"] <= high
            # the band's ends: the step counts nearest to sparsity -/+ band of the site's parameters
            assert low == nearest_steps(site, max(sparsity - band, 0) * site.num_params(), WidthRules())
            assert high == nearest_steps(site, min(sparsity + band, 1) * site.num_params(), WidthRules())
            step = site.params_per_step() / site.num_params()
            assert sparsity - band - step / 2 - 1e-9 <= entry["fraction"] <= sparsity + band + step / 2 + 1e-9
            removed += site.params_removed(entry["steps"])
        assert removed == result.report["params_removed"] == allocation["planned_params_removed"]
        assert abs(removed - sparsity * total) <= largest, (removed, sparsity * total)  # within one step


@pytest.mark.parametrize("seed", range(40))
def test_banded_allocation_on_random_curves_respects_bands_and_budget(seed):
    """Non-convex curves, uneven step sizes, disallowed counts: every site within its band, the total within one
    step of the budget (whenever the bands can reach it)."""
    rng = random.Random(seed)
    curves = []
    for layer in range(rng.randint(2, 5)):
        steps, size = rng.randint(3, 12), rng.randint(1, 7)
        costs = [rng.uniform(0, 3) for _ in range(steps)]
        allowed = [True] + [rng.random() < 0.7 for _ in range(steps)]
        params = [s * size for s in range(steps + 1)]
        curves.append(SiteCurve(layer, "mlp", convex_scores(params, costs, allowed), costs, params, allowed,
                                list(range(steps, -1, -1)), params[-1] + rng.randint(0, 5)))
    fraction, band = rng.uniform(0.1, 0.7), rng.choice([0.0, 0.05, 0.2, 0.5])
    banded = [curve.banded(fraction, band) for curve in curves]
    target = fraction * sum(curve.total_params for curve in curves)
    found = allocate_global(banded, target, fill=True)
    for curve in banded:
        steps = found.steps[curve.key]
        assert curve.min_steps <= steps <= curve.top and curve.allowed[steps]
        assert curve.min_steps == curve.nearest_steps(max(fraction - band, 0) * curve.total_params)
    assert found.removed_params == sum(c.params_removed[found.steps[c.key]] for c in banded)
    lowest = sum(c.params_removed[c.min_steps] for c in banded)
    highest = sum(c.params_removed[c.top] for c in banded)
    if lowest <= target <= highest:
        increments = [c.params_removed[b] - c.params_removed[a] for c in banded for a, b in itertools.pairwise(
            [s for s in range(c.min_steps, c.top + 1) if c.allowed[s]])]
        assert abs(found.removed_params - target) <= max(increments, default=0)


# --- (c) the threshold choice is the exhaustive optimum on convex curves ----------------------------------------

def convex_curve(rng: random.Random, layer: int, steps: int, size: int) -> SiteCurve:
    costs = sorted(rng.uniform(0, 1) for _ in range(steps))  # non-decreasing step costs: a convex cumulative curve
    params = [s * size for s in range(steps + 1)]
    allowed = [True] * (steps + 1)
    return SiteCurve(layer, "mlp", convex_scores(params, costs, allowed), costs, params, allowed,
                     list(range(steps, -1, -1)), params[-1] + size)


def cost_of(curve: SiteCurve, steps: int) -> float:
    return sum(curve.costs[:steps])


@pytest.mark.parametrize("seed", range(30))
def test_banded_threshold_is_the_exhaustive_optimum_on_convex_curves(seed):
    """Equal step sizes: over every allocation within the bands that removes as many parameters, none costs less."""
    rng = random.Random(seed)
    curves = [convex_curve(rng, layer, rng.randint(3, 7), 3) for layer in range(rng.randint(2, 4))]
    fraction, band = rng.uniform(0.2, 0.6), rng.choice([0.1, 0.25, 0.9])
    banded = [curve.banded(fraction, band) for curve in curves]
    found = allocate_global(banded, fraction * sum(c.total_params for c in curves), fill=True)
    cost = sum(cost_of(c, found.steps[c.key]) for c in banded)
    best = min(sum(cost_of(c, s) for c, s in zip(banded, choice))
               for choice in itertools.product(*[range(c.min_steps, c.top + 1) for c in banded])
               if sum(c.params_removed[s] for c, s in zip(banded, choice)) == found.removed_params)
    assert cost == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", range(30))
def test_no_single_step_move_between_sites_lowers_the_cost(seed):
    """Two step sizes: moving one step from one site to another of the same step size (same budget, both within
    their bands) never lowers the total cost."""
    rng = random.Random(seed)
    curves = [convex_curve(rng, layer, rng.randint(4, 12), rng.choice([2, 5])) for layer in range(rng.randint(3, 6))]
    fraction, band = rng.uniform(0.2, 0.6), rng.choice([0.1, 0.3])
    banded = [curve.banded(fraction, band) for curve in curves]
    found = allocate_global(banded, fraction * sum(c.total_params for c in curves), fill=True)
    steps = {c.key: found.steps[c.key] for c in banded}
    for giver, taker in itertools.permutations(banded, 2):
        if giver.params_removed[1] != taker.params_removed[1]:
            continue
        a, b = steps[giver.key], steps[taker.key]
        if a - 1 < giver.min_steps or b + 1 > taker.top:
            continue
        before = cost_of(giver, a) + cost_of(taker, b)
        assert cost_of(giver, a - 1) + cost_of(taker, b + 1) >= before - 1e-12


def test_convex_scores_are_the_hull_slopes_per_parameter():
    params, allowed = [0, 2, 4, 6, 8], [True] * 5
    assert convex_scores(params, [1.0, 2.0, 3.0, 4.0], allowed) == [0.5, 1.0, 1.5, 2.0]  # convex: each step's own
    # a cheap step after a dear one: both score the slope of their chord, (3 + 1) / 4
    assert convex_scores(params, [1.0, 3.0, 1.0, 5.0], allowed) == [0.5, 1.0, 1.0, 2.5]
    # only counts 0, 2 and 4 allowed: slopes between them
    assert convex_scores(params, [1.0, 2.0, 3.0, 4.0], [True, False, True, False, True]) == [0.75, 0.75, 1.75, 1.75]
    # a band [1, 3]: the hull of counts 1..3; outside it the first and last slopes
    assert convex_scores(params, [9.0, 2.0, 3.0, 0.0], allowed, 1, 3) == [1.0, 1.0, 1.5, 1.5]
    for scores in (convex_scores(params, [random.random() for _ in range(4)], allowed) for _ in range(20)):
        assert scores == sorted(scores)


# --- the costs: output error of each step, over the residual energy ---------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_obs_errors_along_any_order_add_up_to_the_reconstructed_error(seed):
    """greedy_obs_elimination with a given order: the cumulative costs are the least-squares output error."""
    n, out = 9, 5
    moment, weight = random_moment(n, seed), random_weight(out, n, seed)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    removed, costs = greedy_obs_elimination(moment.clone(), weight, n - 1, 0.0, order)
    assert removed == order[: n - 1]
    for k in range(1, n):
        assert sum(costs[:k]) == pytest.approx(reconstructed_error(moment, weight, order[:k]), rel=1e-8, abs=1e-10)
    # the greedy order's own costs: the same function of its own order
    greedy, greedy_costs = greedy_obs_elimination(moment.clone(), weight, n - 1, 0.0)
    assert greedy_obs_elimination(moment.clone(), weight, n - 1, 0.0, greedy)[1] == pytest.approx(greedy_costs)


def test_group_obs_errors_along_an_order_add_up_to_the_reconstructed_error():
    size, groups = 3, 4
    n = size * groups
    moment, weight = random_moment(n, 7), random_weight(6, n, 7)
    plan = RemovalPlan(n, size, [[0, 1], [2, 3]], 2)  # GQA per_group: one group from each pool per round
    order = [1, 2, 0, 3]
    removed, costs = greedy_group_elimination(moment.clone(), plan, 0.0, weight, update_weight=True, order=order)
    assert removed == order
    for k in range(1, len(order) + 1):
        units = [g * size + u for g in order[:k] for u in range(size)]
        assert sum(costs[:k]) == pytest.approx(reconstructed_error(moment, weight, units), rel=1e-8, abs=1e-10)


def test_unreconstructed_errors_add_up_to_the_removed_units_output():
    moment, weight = random_moment(8, 3), random_weight(4, 8, 3)
    units = torch.tensor([5, 1, 6, 2, 0, 7])
    costs = unreconstructed_errors(moment, weight, units, 2)
    for k in range(1, 4):
        drop = units[: 2 * k]
        w = weight[:, drop]
        assert sum(costs[:k]) == pytest.approx(float((w @ moment[drop][:, drop] @ w.T).trace()), rel=1e-10)


@pytest.mark.parametrize("ordering", ["zca", "obs"])
@pytest.mark.parametrize("reconstruct", [True, False])
def test_snp_output_errors_follow_its_own_order(ordering, reconstruct):
    model = tiny_llama()
    site = sites_of(model, "mlp")[0]
    stats = SiteStatistics(site.name, site.num_units, torch.device("cpu"))
    stats.update(torch.randn(200, site.num_units, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    config = PruneConfig(ordering=ordering, reconstruct=reconstruct, damping=0.0)
    inputs = SiteInputs(stats, site.plan(site.max_steps()), False, site.consumer_weight.double(), 0)
    snp = get_method("snp")
    removed, _ = snp.order(inputs, config)
    errors = snp.output_errors(inputs, config)
    moment, _ = stats.moments(centered=False)
    weight = site.consumer_weight.double()
    for k in (1, 10, len(removed)):
        if reconstruct:
            expected = reconstructed_error(moment, weight, removed[:k])
        else:
            w = weight[:, removed[:k]]
            expected = float((w @ moment[removed[:k]][:, removed[:k]] @ w.T).trace())
        assert sum(errors[:k]) == pytest.approx(expected, rel=1e-6)
    if ordering == "obs" and reconstruct:
        assert errors == snp.order(inputs, config)[1]
    assert get_method("vbp").output_errors(inputs, config) == get_method("vbp").order(inputs, config)[1]


# --- (d) the residual-stream energy -----------------------------------------------------------------------------

def test_residual_energy_is_measured_on_the_dense_hidden_states(monkeypatch):
    curves = record_curves(monkeypatch)
    calibration = calibration_ids()
    model = tiny_llama()
    with torch.no_grad():
        hidden = model(calibration, output_hidden_states=True).hidden_states  # [l]: what enters block l
    result = prune_quiet(copy.deepcopy(model), targets=MH, sparsity=0.3, allocation="output_error",
                         calibration=calibration, allocation_samples=len(calibration))
    energy = result.report["allocation"]["residual_energy"]
    for layer in range(4):
        expected = float(hidden[layer].double().pow(2).sum(-1).mean())
        assert energy[str(layer)] == pytest.approx(expected, rel=1e-5)
        assert all(curve.energy == energy[str(layer)] for curve in curves[-1] if curve.layer == layer)


def test_residual_energy_skips_padding():
    hidden = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([True] * 5 + [True, True, False, False, False])
    items = [BlockInput(hidden, [{}], mask), BlockInput(hidden[:1] * 2, [{}], None)]
    tokens = torch.cat([hidden.reshape(-1, 4)[mask], hidden[0] * 2])
    assert residual_energy(items, torch.device("cpu")) == pytest.approx(float(tokens.pow(2).sum(-1).mean()), rel=1e-6)


def test_curve_costs_are_the_snp_output_errors_over_the_energy(monkeypatch):
    """The curve of a site under output_error: SNP's output error of each step over the layer's energy, and scores
    (per parameter) that a site's cheapest steps go first."""
    curves = record_curves(monkeypatch)
    result = prune_quiet(tiny_llama(), sparsity=0.3, allocation="output_error", ordering="obs")
    for curve in curves[-1]:
        assert curve.energy == result.report["allocation"]["residual_energy"][str(curve.layer)]
        assert curve.scores == sorted(curve.scores)
        assert len(curve.costs) == 48 and len(curve.scores) == 47 and curve.params_removed[1] == 96
        assert curve.scores[0] <= curve.costs[0] / 96 + 1e-15  # the first hull slope is at most the first step's


@pytest.mark.parametrize("allocation", ["output_error", "cumulative_variance"])
def test_allocation_samples_take_the_curves_from_the_first_windows(allocation, monkeypatch):
    """allocation_samples=N: the dense pass's curves are those of a run calibrated on the first N windows alone, and
    the cut pass still reads every window. By default a quarter of the windows (here 4 of 16: the widest site's 48
    units need 2 windows of 24 tokens)."""
    curves = record_curves(monkeypatch)
    calibration = calibration_ids()
    options = dict(sparsity=0.3, allocation=allocation)
    sampled = prune_quiet(tiny_llama(), calibration=calibration, allocation_samples=2, **options)
    prune_quiet(tiny_llama(), calibration=calibration[:2], allocation_samples=2, **options)
    default = prune_quiet(tiny_llama(), calibration=calibration, **options)
    prune_quiet(tiny_llama(), calibration=calibration, allocation_samples=4, **options)
    every = prune_quiet(tiny_llama(), calibration=calibration, allocation_samples=99, **options)
    assert len(calibration) == 16
    assert [c.costs for c in curves[0]] == [c.costs for c in curves[1]]
    assert [c.costs for c in curves[2]] == [c.costs for c in curves[3]] != [c.costs for c in curves[4]]
    assert [c.costs for c in curves[4]] != [c.costs for c in curves[0]]
    assert [r.report["allocation"]["curve_windows"] for r in (sampled, default, every)] == [2, 4, 16]
    assert sampled.report["calibration_tokens"] == every.report["calibration_tokens"] == calibration.numel()


def test_the_default_curve_windows_hold_as_many_tokens_as_the_widest_site_has_units():
    """Windows of 4 tokens: a quarter of 16 would give 16 tokens for the 48 MLP units; the curves take 12 windows."""
    calibration = calibration_ids(num=16, length=4)
    result = prune_quiet(tiny_llama(), calibration=calibration, sparsity=0.3, allocation="output_error")
    assert result.report["allocation"]["curve_windows"] == 12


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "8"])
def test_bad_allocation_samples_are_refused(value):
    with pytest.raises(ValueError, match="allocation_samples must be a positive integer"):
        prune_quiet(tiny_llama(), sparsity=0.3, allocation="output_error", allocation_samples=value)


# --- (e) end to end ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "opt"])
def test_output_error_prunes_meets_the_budget_and_reloads(family, tmp_path):
    model = TINY[family]()
    sites = site_params(model)
    total = sum(site.num_params() for site in sites.values())
    out = tmp_path / "out"
    result = prune_quiet(model, targets=MH, sparsity=0.35, allocation="output_error", allocation_band=0.2,
                         output_dir=str(out))
    assert abs(result.report["params_removed"] - 0.35 * total) <= max(s.params_per_step() for s in sites.values())
    assert result.report["allocation"]["mode"] == "output_error"
    assert torch.isfinite(logits(result.model)).all()
    expected = logits(result.model)
    got, _ = reload_in_fresh_process(tmp_path, out, "trust_remote_code=True", BLOCK_HF_SNP)
    assert torch.allclose(got, expected, atol=1e-5)


def test_global_is_an_alias_of_cumulative_variance():
    assert PruneConfig(allocation="global").allocation_criterion == "cumulative_variance"
    assert PruneConfig(allocation="output_error").resolved_allocation == "global"
    assert PruneConfig().allocation_criterion is None
    old = prune_quiet(tiny_llama(), targets=MH, sparsity=0.3, allocation="global")
    new = prune_quiet(tiny_llama(), targets=MH, sparsity=0.3, allocation="cumulative_variance")
    assert widths(old) == widths(new) and old.report["allocation"] == new.report["allocation"]
    assert torch.equal(logits(old.model), logits(new.model))


@pytest.mark.parametrize("method", ["snp", "vbp"])
def test_output_error_on_a_vision_transformer(method):
    model = TINY_VISION["vit"]()
    sites = site_params(model)
    total = sum(site.num_params() for site in sites.values())
    result = hf_snp.prune(model, calibration=pixel_values(), batch_size=4, progress=False, method=method, targets=MH,
                          sparsity=0.4, allocation="output_error")
    assert abs(result.report["params_removed"] - 0.4 * total) <= max(s.params_per_step() for s in sites.values())
    assert len(result.report["allocation"]["residual_energy"]) == 3
    assert image_logits(result.model).isfinite().all()


@pytest.mark.parametrize("block_search", ["candidates", "iterative"])
def test_output_error_serves_the_block_and_unit_search(block_search):
    result = prune_quiet(tiny_llama(), targets=("mlp", "blocks"), sparsity=0.3, allocation="output_error",
                         block_search=block_search)
    assert torch.isfinite(logits(result.model)).all()


@pytest.mark.parametrize("bad, message", [
    (dict(allocation="output_error", allocation_band=1.0), r"allocation_band must be a fraction in \[0, 1\)"),
    (dict(allocation_band=-0.1), r"allocation_band must be a fraction in \[0, 1\)"),
    (dict(allocation="output_error", layer_sparsity={0: 0.1}), r"layer_sparsity fixes each layer's budget"),
])
def test_bad_band_options(bad, message, no_long_work):
    with pytest.raises(ValueError, match=message):
        hf_snp.prune(tiny_llama(), calibration=torch.zeros(2, 4, dtype=torch.long), **bad)
