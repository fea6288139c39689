"""Baselines in the same engine: flap, wanda_sp, magnitude."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    TINY,
    calibration_ids,
    logits,
    make_constant_neurons,
    mlp_sites,
    prune_quiet,
    sparsity_removing,
    tiny_llama,
    tiny_opt,
)
from transformers import AutoModelForCausalLM

from hf_snp.config import PruneConfig
from hf_snp.methods import SiteInputs, get_method
from hf_snp.units.removal import RemovalPlan
from hf_snp.units.stats import SiteStatistics

BASELINES = ["flap", "wanda_sp", "magnitude"]


def test_flap_is_exact_on_constant_neurons():
    """A constant neuron has no fluctuation: FLAP removes it and folds its value into the bias."""
    model = tiny_opt()
    make_constant_neurons(model, 12)
    reference = logits(model)
    result = prune_quiet(model, method="flap", sparsity=sparsity_removing(model, 12))
    assert (logits(result.model) - reference).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["wanda_sp", "magnitude"])
def test_scorers_remove_neurons_whose_outputs_are_unused(method):
    model = tiny_llama()
    with torch.no_grad():  # the last 12 neurons of each layer feed nothing
        for site in mlp_sites(model):
            site.consumer_linear.weight[:, -12:] = 0
    reference = logits(model)
    result = prune_quiet(copy.deepcopy(model), method=method, sparsity=sparsity_removing(model, 12))
    assert (logits(result.model) - reference).abs().max() < 1e-5
    moved = prune_quiet(copy.deepcopy(model), method="random", sparsity=sparsity_removing(model, 12))
    assert (logits(moved.model) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_baselines_prune_heads_and_mlp_and_reload(method, family, allocation, tmp_path):
    model = TINY[family]()
    before = sum(p.numel() for p in model.parameters())
    result = prune_quiet(model, method=method, sparsity=0.3, targets=("mlp", "heads"), allocation=allocation,
                         output_dir=str(tmp_path / "out"))
    assert result.report["params_after"] == sum(p.numel() for p in result.model.parameters()) < before
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-5)


# --- properties of the baselines' choices, checked against scores computed here from the activations ---

HEAD_DIM = 8  # tiny models: hidden 32, 4 heads
UNIT_PARAMS = {  # parameters one unit takes out of its site (MLP neuron, query head)
    ("llama", "mlp"): 3 * 32,  # gate row, up row, down column
    ("opt", "mlp"): 32 + 1 + 32,  # fc1 row and bias, fc2 column
    ("llama", "heads"): 2 * HEAD_DIM * 32,  # q rows, o columns (per_group keeps k and v)
    ("opt", "heads"): 3 * (HEAD_DIM * 32 + HEAD_DIM) + 32 * HEAD_DIM,  # q, k, v rows with biases, out_proj columns
}
SITE_PARAMS = {("llama", "mlp"): 3 * 48 * 32, ("opt", "mlp"): 2 * 48 * 32 + 48 + 32,
               ("llama", "heads"): 2 * 32 * 32 + 2 * 16 * 32, ("opt", "heads"): 4 * (32 * 32 + 32)}


def decoder_layers(model):
    return model.model.decoder.layers if model.config.model_type.endswith("opt") else model.model.layers


def producer_and_consumer(layer, target):
    """The linear whose rows are the units (MLP: up / fc1; heads: q), and the linear the units feed."""
    if target == "heads":
        return layer.self_attn.q_proj, getattr(layer.self_attn, "o_proj", None) or layer.self_attn.out_proj
    return (layer.mlp.up_proj, layer.mlp.down_proj) if hasattr(layer, "mlp") else (layer.fc1, layer.fc2)


def consumer_inputs(dense, pruned, target):
    """Per layer i, the input of layer i's consumer as the engine sees it: layers < i pruned, layer i dense.

    Built by running the pruned model with its layer i swapped for the dense one (put back afterwards).
    """
    inputs = []
    for i in range(len(decoder_layers(dense))):
        own = decoder_layers(pruned)[i]
        decoder_layers(pruned)[i] = decoder_layers(dense)[i]
        captured = []
        consumer = producer_and_consumer(decoder_layers(dense)[i], target)[1]
        hook = consumer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
        try:
            with torch.no_grad():
                pruned(calibration_ids(), use_cache=False)
        finally:
            hook.remove()
            decoder_layers(pruned)[i] = own
        inputs.append(torch.cat(captured).flatten(0, -2).double())
    return inputs


def unit_scores(method, x, weight, target="mlp"):
    """The documented per-unit score: FLAP var(X_j)·‖W_:,j‖² (squared on heads, as FLAP does for o_proj),
    wanda_sp ‖X_j‖·Σ|W_:,j|, magnitude ‖W_:,j‖."""
    weight = weight.detach().double()
    if method == "flap":
        metric = x.var(0, unbiased=False) * weight.pow(2).sum(0)
        return metric.pow(2) if target == "heads" else metric
    if method == "wanda_sp":
        return x.pow(2).sum(0).sqrt() * weight.abs().sum(0)
    return weight.pow(2).sum(0).sqrt()


def kept_groups(dense_producer, pruned_producer, size):
    """Which groups of ``size`` producer rows survived (matched by their weights, which baselines leave alone)."""
    dense_rows = dense_producer.weight.reshape(-1, size * dense_producer.in_features)
    kept = []
    for row in pruned_producer.weight.reshape(-1, size * pruned_producer.in_features):
        matches = [g for g in range(len(dense_rows)) if torch.equal(dense_rows[g], row)]
        assert len(matches) == 1
        kept.append(matches[0])
    return kept


def pools_of(family, num_heads=4, num_kv=2):
    """Query heads a per_group step chooses among: one pool per KV group (Llama GQA); one pool for OPT."""
    if family == "opt":
        return [list(range(num_heads))]
    per = num_heads // num_kv
    return [list(range(k * per, (k + 1) * per)) for k in range(num_kv)]


@pytest.mark.parametrize("target", ["mlp", "heads"])
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", BASELINES)
def test_baselines_remove_the_lowest_scored_units(method, family, target):
    """Every layer loses exactly the lowest-scored units (heads: within each KV group's pool) by the
    method's documented score, computed here from the activations the engine saw."""
    dense = TINY[family]()
    result = prune_quiet(copy.deepcopy(dense), method=method, sparsity=0.3, targets=(target,))
    size = HEAD_DIM if target == "heads" else 1
    xs = consumer_inputs(dense, result.model, target)
    for i, (dense_layer, pruned_layer) in enumerate(zip(decoder_layers(dense), decoder_layers(result.model))):
        dense_producer, dense_consumer = producer_and_consumer(dense_layer, target)
        kept = kept_groups(dense_producer, producer_and_consumer(pruned_layer, target)[0], size)
        removed = set(range(dense_producer.out_features // size)) - set(kept)
        assert removed, f"layer {i}: nothing removed, the test would be vacuous"
        scores = unit_scores(method, xs[i], dense_consumer.weight, target).reshape(-1, size).sum(1)
        pools = pools_of(family) if target == "heads" else [list(range(len(scores)))]
        per_pool = len(removed) // len(pools)
        expected = {g for pool in pools for g in sorted(pool, key=lambda g: float(scores[g]))[:per_pool]}
        assert removed == expected, \
            f"layer {i}: removed {sorted(removed)}, lowest scores {sorted(expected)}: {scores.tolist()}"


def removed_and_added(family, report, targets):
    """Parameters the report's widths take out (counted here per unit), and the biases it says were added."""
    removed = added = 0
    for layer in report["layers"]:
        if "mlp" in targets:
            removed += (layer["mlp_width_before"] - layer["mlp_width"]) * UNIT_PARAMS[(family, "mlp")]
            added += 32 * layer["mlp_output_bias_added"]
        if "heads" in targets:
            removed += (layer["num_heads_before"] - layer["num_heads"]) * UNIT_PARAMS[(family, "heads")]
            added += 32 * layer["attention_output_bias_added"]
    return removed, added


def assert_widths_are_the_modules(model, report, targets):
    for layer, record in zip(decoder_layers(model), report["layers"]):
        if "mlp" in targets:
            assert producer_and_consumer(layer, "mlp")[1].in_features == record["mlp_width"]
        if "heads" in targets:
            assert producer_and_consumer(layer, "heads")[1].in_features == record["num_heads"] * HEAD_DIM


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", BASELINES)
def test_baselines_uniform_budget_and_parameter_counts(method, family):
    """Uniform: each layer removes the unit count whose parameters come nearest 30% of its site, and the
    report's widths and parameter counts are those of the modules."""
    model = TINY[family]()
    before = sum(p.numel() for p in model.parameters())
    targets = ("mlp", "heads")
    result = prune_quiet(model, method=method, sparsity=0.3, targets=targets)
    report = result.report
    assert_widths_are_the_modules(result.model, report, targets)
    removed, added = removed_and_added(family, report, targets)
    assert report["params_before"] == before
    assert report["params_after"] == sum(p.numel() for p in result.model.parameters()) == before - removed + added
    for record in report["layers"]:
        mlp_unit = UNIT_PARAMS[(family, "mlp")]
        nearest = min(range(48), key=lambda n: (abs(n * mlp_unit - 0.3 * SITE_PARAMS[(family, "mlp")]), n))
        assert record["mlp_width_before"] - record["mlp_width"] == nearest
        head_step = UNIT_PARAMS[(family, "heads")] * (2 if family == "llama" else 1)  # per_group: one head per KV group
        heads_budget = 0.3 * SITE_PARAMS[(family, "heads")]
        steps = min(range(3 if family == "llama" else 5), key=lambda s: (abs(s * head_step - heads_budget), s))
        assert (record["num_heads_before"] - record["num_heads"]) * UNIT_PARAMS[(family, "heads")] == steps * head_step


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", BASELINES)
def test_baselines_global_allocation_meets_the_budget(method, family):
    """Global: the removed parameters (counted here) are what the plan says, within one step of 30% of
    all the sites' parameters; widths and counts are those of the modules."""
    model = TINY[family]()
    before = sum(p.numel() for p in model.parameters())
    targets = ("mlp", "heads")
    result = prune_quiet(model, method=method, sparsity=0.3, targets=targets, allocation="global")
    report = result.report
    assert_widths_are_the_modules(result.model, report, targets)
    removed, added = removed_and_added(family, report, targets)
    assert report["params_after"] == sum(p.numel() for p in result.model.parameters()) == before - removed + added
    budget = 0.3 * 4 * (SITE_PARAMS[(family, "mlp")] + SITE_PARAMS[(family, "heads")])
    assert report["allocation"]["target_params_removed"] == round(budget)
    assert report["allocation"]["planned_params_removed"] == removed
    largest_step = max(UNIT_PARAMS[(family, "mlp")], UNIT_PARAMS[(family, "heads")] * (2 if family == "llama" else 1))
    assert abs(removed - budget) <= largest_step
    assert 0 < removed


@pytest.mark.parametrize("method", BASELINES)
def test_baselines_global_threshold_cuts_the_documented_scores(method):
    """OPT (one pool per site): with global allocation, each site removes exactly its units whose global
    score is at or below the reported threshold; scores from the dense model's activations (the dense
    statistics pass): raw scores for wanda_sp and magnitude; for FLAP the channel metric standardised over the
    site's channels, averaged per head."""
    dense = tiny_opt()
    result = prune_quiet(copy.deepcopy(dense), method=method, sparsity=0.3, targets=("mlp", "heads"),
                         allocation="global", allocation_samples=16)  # the dense pass on every window, as below
    threshold = result.report["allocation"]["threshold"]
    for target, size, width_key in (("mlp", 1, "mlp_width"), ("heads", HEAD_DIM, "num_heads")):
        xs = consumer_inputs(dense, dense, target)  # dense pass: every layer sees dense inputs
        for i, layer in enumerate(decoder_layers(dense)):
            metric = unit_scores(method, xs[i], producer_and_consumer(layer, target)[1].weight, target)
            groups = metric.reshape(-1, size)
            if method == "flap":  # FLAP: standardised over the site's channels, then the mean per head
                costs = ((groups - metric.mean()) / metric.std()).mean(1).sort().values
            else:
                costs = groups.sum(1).sort().values
            # the threshold is one of the scores (computed here in another order: a relative slack)
            expected = int((costs <= threshold + 1e-6 * max(1.0, abs(threshold))).sum())
            max_steps = len(costs) - 1 if target == "mlp" else len(costs)
            record = result.report["layers"][i]
            assert record[width_key + "_before"] - record[width_key] == min(expected, max_steps), (target, i)


@pytest.mark.parametrize("target", ["mlp", "heads"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_flap_folds_the_removed_units_means_into_the_bias(family, target):
    """FLAP's compensation: the consumer's bias moves by W_P mu_P (mu_P: the removed units' means over
    the calibration tokens, computed here), and the kept columns are the dense ones."""
    dense = TINY[family]()
    result = prune_quiet(copy.deepcopy(dense), method="flap", sparsity=0.3, targets=(target,))
    size = HEAD_DIM if target == "heads" else 1
    xs = consumer_inputs(dense, result.model, target)
    for i, (dense_layer, pruned_layer) in enumerate(zip(decoder_layers(dense), decoder_layers(result.model))):
        dense_producer, dense_consumer = producer_and_consumer(dense_layer, target)
        pruned_producer, pruned_consumer = producer_and_consumer(pruned_layer, target)
        kept = kept_groups(dense_producer, pruned_producer, size)
        keep = torch.tensor([g * size + d for g in kept for d in range(size)])
        drop = torch.tensor(sorted(set(range(dense_consumer.in_features)) - set(keep.tolist())))
        assert len(drop)
        assert torch.equal(pruned_consumer.weight, dense_consumer.weight[:, keep])
        old_bias = dense_consumer.bias if dense_consumer.bias is not None else torch.zeros(dense_consumer.out_features)
        assert pruned_consumer.bias is not None  # Llama: FLAP adds the bias its compensation needs
        shift = dense_consumer.weight.double()[:, drop] @ xs[i][:, drop].mean(0)
        torch.testing.assert_close((pruned_consumer.bias.double() - old_bias.double()), shift, rtol=1e-4, atol=1e-5)


# --- FLAP on heads as FLAP does it (CASIA-IVA-Lab/FLAP lib/prune.py, metric 'WIFV') ---

# per channel of 4 heads of 2 channels: the fluctuation var(X_j) (the consumer weight has unit columns, so this is
# also the metric m_j). Summed per head (the unsquared score) head 0 would go first in KV group 0; FLAP squares
# the o_proj metric, and then head 1 goes first.
HAND_VARIANCES = [1.0, 9.0, 5.0, 6.0, 2.0, 2.0, 0.5, 7.0]


def hand_head_site(pools, rounds):
    """Two tokens per channel, +a_j and -a_j: var = a_j² exactly (population variance, mean 0)."""
    amplitude = torch.tensor(HAND_VARIANCES, dtype=torch.float64).sqrt()
    stats = SiteStatistics("hand", 8, torch.device("cpu"))
    stats.update(torch.stack([amplitude, -amplitude]))
    weight = torch.zeros(3, 8, dtype=torch.float64)
    weight[0] = 1.0  # ||W_:,j|| = 1: the metric is the variance
    return SiteInputs(stats, RemovalPlan(8, 2, pools, rounds), True, weight, 0)


def hand_flap_head_scores():
    """From the definition: m_j = var_j·||W_:,j||², squared on heads, standardised over the 8 channels (mean,
    unbiased std as torch.std in FLAP), then the mean per head."""
    squared = [v * v for v in HAND_VARIANCES]  # 1, 81, 25, 36, 4, 4, 0.25, 49
    mean = sum(squared) / 8
    std = (sum((v - mean) ** 2 for v in squared) / 7) ** 0.5
    z = [(v - mean) / std for v in squared]
    return [(z[2 * h] + z[2 * h + 1]) / 2 for h in range(4)]


def test_flap_head_score_is_the_per_head_mean_of_the_standardised_squared_metric():
    scores = hand_flap_head_scores()  # head sums of m²: 82, 61, 8, 49.25
    assert scores[1] < scores[0]  # squared: head 1 is the weaker of KV group 0 (summed m: 10 < 11 says head 0)
    flap = get_method("flap")
    config = PruneConfig(method="flap")
    # GQA per_group: one head from each KV group's pool
    removed, _ = flap.order(hand_head_site([[0, 1], [2, 3]], 1), config)
    assert sorted(removed) == [1, 2]
    # one pool (MHA), the full curve: every head, lowest first; global scores are FLAP's standardised head scores
    removed, costs = flap.order(hand_head_site([[0, 1, 2, 3]], 4), config)
    expected_order = sorted(range(4), key=lambda h: scores[h])
    assert removed == expected_order == [2, 3, 1, 0]
    assert flap.global_scores(costs) == pytest.approx([scores[h] for h in expected_order], rel=1e-5, abs=1e-6)
    unsquared = [HAND_VARIANCES[2 * h] + HAND_VARIANCES[2 * h + 1] for h in expected_order]  # the mean-fold error
    assert flap.output_errors(hand_head_site([[0, 1, 2, 3]], 4), config) == pytest.approx(unsquared, rel=1e-5)
    decision = flap.decide(hand_head_site([[0, 1], [2, 3]], 1), config)
    assert decision.drop.tolist() == [2, 3, 4, 5] and decision.coef is None  # FLAP folds means, never reconstructs


@pytest.mark.parametrize("gqa_mode", ["per_group", "kv_groups"])
def test_flap_heads_on_gqa_keep_the_kv_structure(gqa_mode):
    """Llama GQA (4 query heads on 2 KV heads): per_group removes one query head from each KV group (by the
    squared metric within the group), kv_groups whole KV groups; the model runs and reloads its shapes."""
    model = tiny_llama()
    result = prune_quiet(model, method="flap", sparsity=0.3, targets=("heads",), gqa_mode=gqa_mode)
    for layer, record in zip(decoder_layers(result.model), result.report["layers"]):
        if gqa_mode == "per_group":
            assert (record["num_heads"], record["num_kv_heads"]) == (2, 2)
        else:
            assert (record["num_heads"], record["num_kv_heads"]) == (2, 1)
        assert layer.self_attn.o_proj.in_features == record["num_heads"] * HEAD_DIM
        assert layer.self_attn.k_proj.out_features == record["num_kv_heads"] * HEAD_DIM
    assert torch.isfinite(logits(result.model)).all()
