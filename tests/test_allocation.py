"""Allocation: budgets met within one step, global cuts redundant layers first, ablation switches."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    TINY,
    calibration_ids,
    logits,
    make_scaled_copies,
    mlp_sites,
    prune_quiet,
    sites_of,
    tiny_llama,
    tiny_opt,
)

import hf_snp


def targeted_params(model, targets):
    return sum(site.num_params() for t in targets for site in sites_of(model, t))


def record_curves(monkeypatch) -> list:
    """Every list of curves global allocation's dense pass returns, in order."""
    from hf_snp.passes.engine import StreamingEngine

    seen, original = [], StreamingEngine.collect_curves
    monkeypatch.setattr(StreamingEngine, "collect_curves",
                        lambda self, calib, rules: seen.append(original(self, calib, rules)) or seen[-1])
    return seen


def largest_step(model, targets, round_to=None):
    steps = [site.params_per_step() * (round_to or 1 if site.kind == "mlp" else 1)
             for t in targets for site in sites_of(model, t)]
    return max(steps)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("targets", [("mlp",), ("heads",), ("mlp", "heads")])
@pytest.mark.parametrize("round_to", [None, 8])
def test_a_budget_of_n_parameters_removes_n_within_one_step(family, allocation, targets, round_to, monkeypatch):
    """Uniform: within one step per layer. Global: the nearest any threshold on the curves can get; that is
    within one step unless several sites' steps score the same (the last head step of every site scores 1.0,
    all of its cost, so those cross a threshold together)."""
    curves = record_curves(monkeypatch)
    model = TINY[family]()
    total, step = targeted_params(model, targets), largest_step(model, targets, round_to)
    for sparsity in (0.2, 0.45):
        result = prune_quiet(copy.deepcopy(model), method="snp", sparsity=sparsity, targets=targets,
                             allocation=allocation, round_to=round_to)
        removed, target = result.report["params_removed"], sparsity * total
        if allocation == "global":
            thresholds = [float("-inf")] + sorted({score for curve in curves[-1] for score in curve.scores})
            reachable = {sum(c.params_removed[c.steps_at(t)] for c in curves[-1]) for t in thresholds}
            assert removed in reachable
            assert abs(removed - target) == min(abs(r - target) for r in reachable), (removed, target)
            scores = [score for curve in curves[-1] for score in curve.scores]
            if len(set(scores)) == len(scores):  # no ties: each threshold moves one site by one step
                assert abs(removed - target) <= step, (removed, target)
        else:
            assert abs(removed - target) <= step * len(mlp_sites(model)), (removed, target)  # rounds once per layer
        if round_to:
            assert all(layer["mlp_width"] % round_to == 0 for layer in result.report["layers"] if "mlp_width" in layer)


def test_sparsity_per_target_fixes_each_budget():
    model = tiny_llama()
    result = prune_quiet(model, targets=("mlp", "heads"), sparsity_per_target={"mlp": 0.4, "heads": 0.0},
                         allocation="global")
    assert all(layer["num_heads"] == 4 for layer in result.report["layers"])
    mlp_removed = sum(record["mlp_width_before"] - record["mlp_width"] for record in result.report["layers"]) \
        * mlp_sites(model)[0].params_per_step()
    assert abs(mlp_removed - 0.4 * targeted_params(tiny_llama(), ("mlp",))) <= mlp_sites(model)[0].params_per_step()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_global_allocation_cuts_the_redundant_layers_first(family):
    model = TINY[family]()
    make_scaled_copies(model, 12, layers={1, 3})  # only layers 1 and 3 carry redundant neurons
    reference = logits(model)
    site = mlp_sites(model)[0]
    sparsity = 24 * site.params_per_step() / (4 * site.num_params())  # exactly the 24 redundant neurons
    calibration = calibration_ids(96, 24)  # enough tokens that every ReLU fires: no neuron is idle on the data
    result = prune_quiet(copy.deepcopy(model), method="snp", sparsity=sparsity, allocation="global",
                         calibration=calibration, allocation_samples=96)  # the curves too see every token
    assert [record["mlp_width"] for record in result.report["layers"]] == [48, 36, 48, 36]
    assert (logits(result.model) - reference).abs().max() < 1e-4
    uniform = prune_quiet(copy.deepcopy(model), method="snp", sparsity=sparsity, allocation="uniform",
                          calibration=calibration)
    assert (logits(uniform.model) - reference).abs().max() > 1e-2  # the same budget spread evenly loses information


def test_reconstruct_false_leaves_the_kept_columns_untouched():
    model = tiny_opt()
    original = [site.consumer_linear.weight.detach().clone() for site in mlp_sites(model)]
    result = prune_quiet(copy.deepcopy(model), sparsity=0.3, reconstruct=False, allocation="uniform")
    reconstructed = prune_quiet(copy.deepcopy(model), sparsity=0.3, allocation="uniform")
    for before, site, other in zip(original, mlp_sites(result.model), mlp_sites(reconstructed.model)):
        kept = [i for i in range(48)
                if any(torch.equal(site.consumer_linear.weight[:, j], before[:, i]) for j in range(site.num_units))]
        assert len(kept) == site.num_units  # every kept column is an original column, unchanged
        assert not torch.equal(other.consumer_linear.weight, site.consumer_linear.weight)


def test_natural_ordering_keeps_the_first_units():
    model = tiny_llama()
    gate = [site.producer_linears[0].weight.detach().clone() for site in mlp_sites(model)]
    result = prune_quiet(model, sparsity=0.25, ordering="natural", allocation="uniform")
    for before, site in zip(gate, mlp_sites(result.model)):
        assert torch.equal(site.producer_linears[0].weight, before[: site.num_units])


@pytest.mark.parametrize("ordering", ["zca", "output_aware"])
def test_greedy_orderings_find_the_redundant_neurons(ordering):
    model = tiny_llama()
    make_scaled_copies(model, 12)
    reference = logits(model)
    site = mlp_sites(model)[0]
    result = prune_quiet(model, sparsity=12 * site.params_per_step() / site.num_params(), ordering=ordering,
                         allocation="uniform")
    assert (logits(result.model) - reference).abs().max() < 1e-4


def test_random_ordering_depends_on_the_seed():
    runs = [prune_quiet(tiny_llama(), sparsity=0.3, ordering="random", allocation="uniform", seed=s) for s in (1, 1, 2)]
    weights = [mlp_sites(r.model)[0].producer_linears[0].weight for r in runs]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_global_vbp_runs_and_reports_its_threshold():
    result = prune_quiet(tiny_llama(), method="vbp", sparsity=0.3, allocation="global", allocation_samples=16)
    allocation = result.report["allocation"]
    assert allocation["mode"] == "cumulative_variance" and allocation["threshold"] is not None
    assert len(allocation["curves"]) == 4
    # VBP's costs are the units' variances on the dense model, removed smallest first: each curve is
    # 1 - (sum of the s smallest variances) / (sum of all), and the threshold (a variance) cuts every
    # unit at or below it, so each layer keeps exactly its units with a larger variance.
    inputs = {}
    dense = tiny_llama()
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0]))
             for i, layer in enumerate(dense.model.layers)]
    with torch.no_grad():
        for batch in calibration_ids().split(4):
            dense(batch)
    for hook in hooks:
        hook.remove()
    threshold = allocation["threshold"]
    for i in range(4):
        h = torch.cat(inputs[i]).reshape(-1, 48).double()
        variance = h.var(0, unbiased=False).sort().values
        expected = [1.0] + (1 - variance.cumsum(0) / variance.sum()).clamp_min(0).tolist()
        assert allocation["curves"][f"{i}.mlp"] == pytest.approx(expected, abs=2e-5)
        assert result.report["layers"][i]["mlp_width"] == 48 - int((variance <= threshold * (1 + 1e-6)).sum())
    assert abs(allocation["planned_params_removed"] - allocation["target_params_removed"]) <= 3 * 32 / 2


def test_unreachable_budget_fails_before_long_work(no_long_work):
    with pytest.raises(ValueError, match=r"the budget cannot be met: 50% of mlp .* at most .* \(17%\) can be removed"):
        hf_snp.prune(tiny_llama(), sparsity=0.5, min_width=40, calibration=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("bad, message", [
    (dict(allocation="best"), r"unknown allocation 'best'"),
    (dict(ordering="magic"), r"unknown ordering 'magic'"),
    (dict(method="vbp", ordering="natural"), r"ordering='natural' is an SNP ablation.*'vbp'"),
    (dict(round_to=0), r"round_to must be a positive integer"),
    (dict(min_width={"attention": 2}),
     r"min_width must be a positive integer or a \{target: integer\} mapping.*'attention'"),
    (dict(sparsity_per_target={"heads": 0.2}), r"sparsity_per_target names 'heads', which is not among targets"),
    (dict(allocation="global", layer_sparsity={0: 0.1}), r"layer_sparsity fixes each layer's budget.*global"),
])
def test_bad_allocation_options(bad, message, no_long_work):
    with pytest.raises(ValueError, match=message):
        hf_snp.prune(tiny_llama(), calibration=torch.zeros(2, 4, dtype=torch.long), **bad)


def test_report_plot_draws_the_curves(tmp_path):
    result = prune_quiet(tiny_llama(), sparsity=0.3, targets=("mlp", "heads"), allocation="global")
    path = result.report.plot(str(tmp_path / "r.png"))
    assert open(path, "rb").read(4) == b"\x89PNG"
    assert set(result.report["allocation"]["curves"]) == {f"{i}.{k}" for i in range(4) for k in ("mlp", "heads")}
