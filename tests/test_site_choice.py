"""SNP's per-site choice by held-out error (ordering='heldout', docs/design.md §3.12).

Properties: the mean-shift candidate's held-out error is the one computed from the activations (fit the mean on the
other folds, predict the fold); the chosen decision's held-out error is at most every candidate's; where the
least-squares map overfits (fewer tokens than units, no redundancy) the mean shift wins, and where the removed units
are planted copies the map wins; the choice is recorded per layer in the report and reloads from it."""

from __future__ import annotations

import pytest
import torch
from conftest import prune_quiet, tiny_gemma2, tiny_llama
from test_obs_ridge import batches_and_mask, feed, fold_tokens, random_weight

from hf_snp.config import PruneConfig
from hf_snp.methods.choice import CANDIDATES, candidate_errors, choose_decision
from hf_snp.methods.snp import SNP
from hf_snp.units.records import LayerRecord
from hf_snp.units.removal import RemovalPlan
from hf_snp.units.ridge import heldout_mean_error
from hf_snp.units.site_inputs import SiteInputs
from hf_snp.units.stats import SiteStatistics

CPU = torch.device("cpu")


def direct_mean_error(folds: list[torch.Tensor], centered: bool, weight, drop) -> float:
    """The mean squared consumer-output error of the removed units on the last fold's tokens, predicted by the other
    folds' mean (centred) or by nothing."""
    held, train = folds[-1], torch.cat(folds[:-1])
    prediction = train.mean(0)[drop] if centered else torch.zeros(len(drop), dtype=train.dtype)
    return float(((held[:, drop] - prediction) @ weight[:, drop].T).pow(2).sum()) / held.shape[0]


@pytest.mark.parametrize("folds", [2, 3])
@pytest.mark.parametrize("centered", [False, True])
def test_mean_shift_heldout_error_is_the_direct_one(folds, centered):
    n = 10
    batches = batches_and_mask(n, 11)
    stats = feed(SiteStatistics("s", n, CPU, folds), batches)
    drop = torch.tensor([2, 5, 7])
    weight = random_weight(4, n, 1)
    want = direct_mean_error(fold_tokens(batches, folds), centered, weight, drop)
    assert heldout_mean_error(stats, centered, weight, drop) == pytest.approx(want, rel=1e-6)


def site(x: torch.Tensor, removed: int, centered: bool, seed: int = 0) -> SiteInputs:
    stats = SiteStatistics("s", x.shape[1], CPU, folds=2)
    stats.update(x)
    plan = RemovalPlan(x.shape[1], 1, [list(range(x.shape[1]))], removed)
    return SiteInputs(stats, plan, centered, random_weight(6, x.shape[1], seed), seed)


def heldout_config() -> PruneConfig:
    return PruneConfig(ordering="heldout")


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_the_chosen_decision_has_the_least_heldout_error(centered, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = [40, 400][seed % 2]
    x = torch.randn(tokens, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g,
                                                                                  dtype=torch.float64) + 1.0
    inputs = site(x, 8, centered, seed)
    found = candidate_errors(SNP(), inputs, heldout_config())
    decision = choose_decision(SNP(), inputs, heldout_config())
    assert {name for name, _, _ in found} <= set(CANDIDATES)
    assert decision.candidate_errors[decision.choice] == min(error for _, _, error in found)
    assert all(decision.candidate_errors[decision.choice] <= error for _, _, error in found)
    if decision.choice == "variance":
        assert decision.coef is None
    else:
        assert decision.coef is not None and decision.ridge is not None


@pytest.mark.parametrize("seed", range(3))
def test_the_mean_shift_wins_where_the_map_overfits(seed):
    """Independent units of distinct variances (every order removes the same, least varying ones) with means, into
    an identity consumer; 30 tokens per fold for 36 kept units: any map fits noise, the mean does not."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 40, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 40, dtype=torch.float64) + 2
    stats = SiteStatistics("s", 40, CPU, folds=2)
    stats.update(x)
    inputs = SiteInputs(stats, RemovalPlan(40, 1, [list(range(40))], 4), True, torch.eye(40, dtype=torch.float64), 0)
    decision = choose_decision(SNP(), inputs, heldout_config())
    assert decision.choice == "variance"
    assert decision.coef is None and decision.shift is not None


@pytest.mark.parametrize("seed", range(3))
def test_the_map_wins_where_the_removed_units_are_copies(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(500, 12, generator=g, dtype=torch.float64)
    x = torch.cat([base, base[:, :4] * 2.0 + 0.01 * torch.randn(500, 4, generator=g, dtype=torch.float64)], 1)
    decision = choose_decision(SNP(), site(x, 4, False, seed), heldout_config())
    assert decision.choice in ("obs", "zca")
    assert decision.candidate_errors[decision.choice] < 1e-2 * decision.candidate_errors["variance"]


def test_the_choice_is_recorded_per_layer_and_read_back():
    result = prune_quiet(tiny_llama(0), sparsity=0.25, targets=("mlp", "heads"), num_samples=4, seq_len=16,
                         ordering="heldout")
    layers = result.report["layers"]
    for entry in layers:
        assert entry["mlp_decision"] in CANDIDATES and entry["heads_decision"] in CANDIDATES
        assert LayerRecord.from_dict(entry).to_dict() == entry


def test_heldout_ordering_runs_on_a_post_norm_family():
    result = prune_quiet(tiny_gemma2(0), sparsity=0.25, targets=("mlp",), num_samples=4, seq_len=16,
                         ordering="heldout")
    assert all(entry["mlp_decision"] in CANDIDATES for entry in result.report["layers"])


@pytest.mark.parametrize("options, fix", [(dict(ridge="fixed"), "ridge"), (dict(swaps=2), "swaps"),
                                          (dict(method="vbp"), "SNP ablation")])
def test_heldout_ordering_refuses_what_it_cannot_compare(options, fix):
    with pytest.raises(ValueError, match=fix):
        PruneConfig(ordering="heldout", **options).validate()
