"""Whole-block pruning: an identity-like block goes first, exactly, and the result saves as the stock class."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY, logits, make_scaled_copies, prune_quiet, sites_of
from transformers import AutoModelForCausalLM

from hf_snp import get_adapter


@torch.no_grad()
def make_identity_block(model, index: int) -> None:
    """Zero what block ``index`` writes into the residual stream: its output equals its input."""
    for kind in ("mlp", "heads"):
        site = sites_of(model, kind)[index]
        site.consumer_linear.weight.zero_()
        if site.consumer_linear.bias is not None:
            site.consumer_linear.bias.zero_()


def decoder_layers(model):
    return get_adapter(model.config).layers(model)


def one_block_sparsity(model) -> float:
    layers = decoder_layers(model)
    return sum(p.numel() for p in layers[0].parameters()) \
        / sum(p.numel() for layer in layers for p in layer.parameters())


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_identity_block_is_removed_exactly_and_saves_as_stock(family, tmp_path):
    model = TINY[family]()
    make_identity_block(model, 2)
    reference = logits(model)
    result = prune_quiet(copy.deepcopy(model), targets=("blocks",), sparsity=one_block_sparsity(model),
                         output_dir=str(tmp_path / "out"))
    assert result.report["blocks"]["removed"] == [2]
    assert result.report["blocks"]["similarity"][2] == pytest.approx(1.0, abs=1e-6)
    assert (logits(result.model) - reference).abs().max() < 1e-5
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["model_type"] == family and config["num_hidden_layers"] == 3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == type(model).__name__
    assert torch.allclose(logits(reloaded), reference, atol=1e-5)
    assert result.report["params_removed"] == sum(p.numel() for p in decoder_layers(model)[2].parameters())


def test_cached_generation_after_block_removal():
    """Cache indices are renumbered: cached and uncached greedy generation agree."""
    result = prune_quiet(TINY["llama"](), targets=("blocks",), sparsity=0.5)
    assert result.model.config.num_hidden_layers == 2
    prompt = torch.tensor([[3, 4, 5, 6]])
    cached = result.model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = result.model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_candidate_search_prefers_removing_an_identity_block(family):
    model = TINY[family]()
    make_identity_block(model, 1)
    reference = logits(model)
    result = prune_quiet(copy.deepcopy(model), targets=("mlp", "heads", "blocks"), sparsity=one_block_sparsity(model),
                         block_search="candidates")
    blocks = result.report["blocks"]
    names = [c["name"] for c in blocks["candidates"]]
    assert blocks["chosen"] == "blocks" and blocks["removed"] == [1] and "units" in names
    by_name = {c["name"]: c for c in blocks["candidates"]}
    assert by_name["blocks"]["cka"] == pytest.approx(1.0, abs=1e-9) and by_name["units"]["cka"] < 1.0
    assert (logits(result.model) - reference).abs().max() < 1e-5
    assert result.model.config.num_hidden_layers == 3


def test_candidate_search_prefers_units_when_the_redundancy_is_in_the_units(tmp_path):
    model = TINY["llama"]()
    make_scaled_copies(model, 12)  # every layer: 12 MLP neurons are copies of others
    reference = logits(model)
    site = sites_of(model, "mlp")[0]
    total = sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())
    result = prune_quiet(copy.deepcopy(model), targets=("mlp", "blocks"), block_search="candidates",
                         sparsity=4 * 12 * site.params_per_step() / total, output_dir=str(tmp_path / "out"))
    blocks = result.report["blocks"]
    assert blocks["chosen"] == "units" and blocks["removed"] == []
    assert {c["name"] for c in blocks["candidates"]} >= {"blocks", "units"}
    assert (logits(result.model) - reference).abs().max() < 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-5)


def test_block_pruning_is_not_checkpointed(tmp_path):
    with pytest.raises(ValueError, match="block pruning .* is not checkpointed"):
        prune_quiet(TINY["llama"](), targets=("blocks",), checkpoint_dir=str(tmp_path / "c"))
