"""Attention-head pruning: exactness on built-in redundancy, GQA modes, identity, counts, save/reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY, logits, prune_quiet, sites_of, tiny_llama, tiny_opt
from fresh_python import fresh_python
from test_save_reload import BLOCK_HF_SNP, reload_in_fresh_process
from transformers import AutoModelForCausalLM

D = 8  # head_dim of the tiny models (hidden 32, 4 heads)


@pytest.fixture(scope="module", autouse=True)
def _reload_processes_started():
    """Start the session's two reload processes (fresh_python.py) now: their imports of torch and transformers
    run on the other core while this module prunes, instead of in the first test that reloads."""
    for block in (BLOCK_HF_SNP, "import hf_snp"):
        fresh_python(block)


def _rows(head: int) -> slice:
    return slice(head * D, (head + 1) * D)


@torch.no_grad()
def copy_head(attention, layout, src: int, dst: int, kv_src: int | None, kv_dst: int | None, scale: float) -> None:
    """Query head ``dst`` attends like ``src``; with KV heads given, ``dst``'s KV head is a copy
    of ``src``'s with values times ``scale`` (so head dst outputs scale x head src)."""
    q, k, v = (getattr(attention, n) for n in (layout.q, layout.k, layout.v))
    q.weight[_rows(dst)] = q.weight[_rows(src)]
    if q.bias is not None:
        q.bias[_rows(dst)] = q.bias[_rows(src)]
    if kv_src is not None:
        k.weight[_rows(kv_dst)] = k.weight[_rows(kv_src)]
        v.weight[_rows(kv_dst)] = scale * v.weight[_rows(kv_src)]
        if k.bias is not None:
            k.bias[_rows(kv_dst)] = k.bias[_rows(kv_src)]
            v.bias[_rows(kv_dst)] = scale * v.bias[_rows(kv_src)]


def make_redundant_heads(model, mode: str) -> None:
    """Build heads that one removal step of ``mode`` can remove exactly, in every layer.

    mha (OPT): head 3 is head 1 with values x0.7. per_group (GQA 4q/2kv): head 1 copies head 0,
    head 3 copies head 2 (same KV head). kv_groups: KV group 1 (heads 2, 3) is group 0 x0.7.
    """
    for site in sites_of(model, "heads", mode):
        attention, layout = site.attention, site.layout
        if site.mode == "mha":
            copy_head(attention, layout, 1, 3, 1, 3, 0.7)
        elif mode == "per_group":
            copy_head(attention, layout, 0, 1, None, None, 1.0)
            copy_head(attention, layout, 2, 3, None, None, 1.0)
        else:
            copy_head(attention, layout, 0, 2, 0, 1, 0.7)
            copy_head(attention, layout, 1, 3, None, None, 0.7)


def one_step_sparsity(model, mode: str) -> float:
    site = sites_of(model, "heads", mode)[0]
    return site.params_removed(1) / site.num_params()


CASES = [("opt", "per_group"), ("llama", "per_group"), ("llama", "kv_groups"), ("qwen2", "per_group"),
         ("qwen2", "kv_groups")]


@pytest.mark.parametrize("family, mode", CASES)
def test_snp_heads_exact_when_removed_heads_are_combinations_of_kept_ones(family, mode):
    model = TINY[family]()
    make_redundant_heads(model, mode)
    reference = logits(model)
    sparsity = one_step_sparsity(model, mode)
    result = prune_quiet(copy.deepcopy(model), method="snp", targets=("heads",), sparsity=sparsity, gqa_mode=mode)
    heads = {"opt": (3, 3), "per_group": (2, 2), "kv_groups": (2, 1)}["opt" if family == "opt" else mode]
    assert [(record["num_heads"], record["num_kv_heads"]) for record in result.report["layers"]] == [heads] * 4
    assert (logits(result.model) - reference).abs().max() < 1e-4
    # not vacuous: the same cut without reconstruction moves the logits
    baseline = prune_quiet(copy.deepcopy(model), method="random", targets=("heads",), sparsity=sparsity, gqa_mode=mode)
    assert (logits(baseline.model) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("make", [tiny_opt, lambda: tiny_llama(attention_bias=True)],
                         ids=["opt", "llama-attention-bias"])
def test_vbp_heads_exact_when_removed_head_is_constant(make):
    model = make()
    with torch.no_grad():  # head 3 of every layer: zero value weights -> outputs its value bias, a constant
        for site in sites_of(model, "heads"):
            v = getattr(site.attention, site.layout.v)
            kv = 3 if site.mode == "mha" else 1
            v.weight[_rows(kv)] = 0
    reference = logits(model)
    mode = "per_group" if sites_of(model, "heads")[0].mode == "mha" else "kv_groups"
    sparsity = one_step_sparsity(model, mode)
    result = prune_quiet(copy.deepcopy(model), method="vbp", targets=("heads",), sparsity=sparsity, gqa_mode=mode)
    assert (logits(result.model) - reference).abs().max() < 1e-4
    unfolded = prune_quiet(copy.deepcopy(model), method="random", targets=("heads",), sparsity=sparsity, gqa_mode=mode,
                           seed=5)
    assert (logits(unfolded.model) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("mode", ["per_group", "kv_groups"])
@pytest.mark.parametrize("targets", [("heads",), ("mlp", "heads")])
def test_zero_sparsity_is_identity_with_heads(family, mode, targets):
    model = TINY[family]()
    before = logits(model)
    result = prune_quiet(model, targets=targets, sparsity=0.0, gqa_mode=mode)
    assert torch.equal(logits(result.model), before)
    assert result.report["params_removed"] == 0 and result.report["save_format"] == "stock"


@pytest.mark.parametrize("family, mode", CASES)
@pytest.mark.parametrize("method", ["snp", "vbp"])
def test_parameter_count_matches_report_with_heads(family, mode, method):
    model = TINY[family]()
    before = sum(p.numel() for p in model.parameters())
    result = prune_quiet(model, method=method, targets=("mlp", "heads"), sparsity=0.3, gqa_mode=mode,
                         layer_sparsity={1: 0.999})  # layer 1 loses every head
    after = sum(p.numel() for p in result.model.parameters())
    assert result.report["params_removed"] == before - after
    assert result.report["layers"][1]["num_heads"] == 0


def test_each_target_loses_its_own_fraction():
    model = tiny_llama()
    attention, mlp = sites_of(model, "heads")[0], sites_of(model, "mlp")[0]
    result = prune_quiet(model, targets=("mlp", "heads"), sparsity=0.5, gqa_mode="per_group", allocation="uniform")
    layer = result.report["layers"][0]
    assert layer["num_heads"] == 2 and layer["num_kv_heads"] == 2  # one query head per KV group
    assert layer["mlp_width"] == 24
    removed = sum(record["mlp_width_before"] - record["mlp_width"] for record in result.report["layers"]) \
        * mlp.params_per_step() \
        + 4 * attention.params_removed(1)
    assert result.report["params_removed"] == removed


def test_gqa_stays_valid_in_per_group_mode():
    """The kept query heads of KV group g stay contiguous and in order, so head i still reads KV head i // groups."""
    model = tiny_llama()
    make_redundant_heads(model, "per_group")
    result = prune_quiet(model, targets=("heads",), sparsity=one_step_sparsity(model, "per_group"))
    attention = result.model.model.layers[0].self_attn
    assert attention.num_key_value_groups == 1
    assert attention.q_proj.out_features == 2 * D and attention.k_proj.out_features == 2 * D


@pytest.mark.parametrize("mode, heads", [("per_group", (2, 2)), ("kv_groups", (2, 1))])
def test_uniform_llama_heads_save_as_the_stock_class(tmp_path, mode, heads):
    result = prune_quiet(tiny_llama(), targets=("mlp", "heads"), sparsity=0.5, gqa_mode=mode, allocation="uniform",
                         output_dir=str(tmp_path / "out"))
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (*heads, D)
    got, class_name = reload_in_fresh_process(tmp_path, tmp_path / "out", "", BLOCK_HF_SNP)
    assert class_name == "LlamaForCausalLM"
    assert torch.allclose(got, logits(result.model), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_per_layer_heads_and_a_layer_without_heads_save_as_the_hf_snp_type(tmp_path, family):
    out = tmp_path / "out"
    result = prune_quiet(TINY[family](), method="vbp", targets=("mlp", "heads"), sparsity=0.3,
                         layer_sparsity={0: 0.0, 2: 0.999}, output_dir=str(out))
    assert result.report["layers"][2]["num_heads"] == 0
    config = json.load(open(out / "config.json"))
    assert config["model_type"] == f"hf_snp_{family}"
    assert config["hf_snp_layers"][2]["num_attention_heads"] == 0
    expected = logits(result.model)
    got, _ = reload_in_fresh_process(tmp_path, out, "trust_remote_code=True", BLOCK_HF_SNP)
    assert torch.allclose(got, expected, atol=1e-5)
    got, _ = reload_in_fresh_process(tmp_path, out, "", "import hf_snp")
    assert torch.allclose(got, expected, atol=1e-5)


def test_opt_head_pruning_always_uses_the_hf_snp_type(tmp_path):
    result = prune_quiet(tiny_opt(), targets=("heads",), sparsity=0.25, output_dir=str(tmp_path / "out"))
    assert result.report["save_format"] == "hf_snp"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_generation_with_cache_through_a_layer_without_heads(family):
    """A headless layer still advances the KV cache, so cached generation equals uncached."""
    result = prune_quiet(TINY[family](), targets=("heads",), sparsity=0.2, layer_sparsity={0: 0.999})
    model = result.model
    prompt = torch.tensor([[3, 4, 5, 6]])
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_budget_below_one_head_step_warns_before_pruning():
    with pytest.warns(UserWarning,
                      match=r"sparsity 10% of heads rounds to nothing per layer: one removal step takes 33%"):
        result = prune_quiet(tiny_llama(), targets=("heads",), sparsity=0.1, allocation="uniform")
    assert result.report["params_removed"] == 0
