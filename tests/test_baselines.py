"""Baselines in the same engine: flap, wanda_sp, magnitude."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY, logits, make_constant_neurons, mlp_sites, prune_quiet, sparsity_removing, tiny_llama, tiny_opt
from transformers import AutoModelForCausalLM

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
