"""OLMo 2 attention heads (issue 28 item 4): q_norm/k_norm normalise every head together, so a cut keeps the kept
heads' entries of their weights and rescales them by the least-squares factor of docs/design.md §5.5
(hf_snp.units.qk_norm). Tiny from-config OLMo 2 models, multi-head and GQA: the factor against a brute-force
least-squares fit through the real norm modules, the cut's parameter count, zero heads as the identity, the fitted
factor never worse than none on the calibration tokens, and saved models reloaded in fresh processes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, calibration_ids, logits, prune_quiet, sites_of
from test_save_reload import BLOCK_HF_SNP, reload_in_fresh_process
from transformers import Olmo2Config, Olmo2ForCausalLM

from hf_snp.adapters import get_adapter
from hf_snp.units.qk_norm import NormedDecision, QKNormHeadSite, norm_scale
from hf_snp.units.removal import select_by_score
from hf_snp.units.sites import count_parameters

D = 8  # head_dim: hidden 32 over 4 query heads


def tiny_olmo2(kv_heads: int = 4, layers: int = 3, spread: float = 0.5, seed: int = 0) -> Olmo2ForCausalLM:
    """Hidden 32, 4 query heads on ``kv_heads`` KV heads; noisy norm weights; each head's q/k rows scaled by
    exp(spread * N(0, 1)), so heads differ in size as trained ones do and removing some moves the RMS."""
    torch.manual_seed(seed)
    config = Olmo2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Olmo2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                heads = proj.out_features // D
                proj.weight.mul_(torch.exp(spread * torch.randn(heads)).repeat_interleave(D)[:, None])
    return model


def keep_first(site: QKNormHeadSite, steps: int) -> NormedDecision:
    """A decision removing the last groups of the plan (scores descending), through the site's own ``decide``."""
    class LastGroups:
        def decide(self, inputs, config):
            plan = inputs.plan
            return plan.decision(select_by_score(-torch.arange(plan.num_groups, dtype=torch.float64), plan),
                                 torch.device("cpu"))

    return site.decide(LastGroups(), type("Inputs", (), {"plan": site.plan(steps)})(), None)


@torch.no_grad()
def observed_site(model, mode: str, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> QKNormHeadSite:
    """Layer 0's head site after its statistics run on ``hidden`` (OLMo 2 has no norm before the attention)."""
    site = sites_of(model, "heads", mode)[0]
    stats = site.new_statistics(torch.device("cpu"))
    stats.token_mask = mask
    handles = site.observe(stats)
    try:
        attention = site.attention
        position = torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1)
        attention(hidden, position_embeddings=model.model.rotary_emb(hidden, position), attention_mask=None)
    finally:
        for handle in handles:
            handle.remove()
    return site


@torch.no_grad()
def brute_force_scale(norm, x: torch.Tensor, keep: list[int]) -> float:
    """argmin_c Σ_t ‖c·norm_K(x_K) − norm(x)_K‖² by lstsq, through a copy of the real norm module cut to the kept
    heads (factor 1): the dense model's normalised kept entries against the cut norm's."""
    rows = torch.cat([torch.arange(h * D, (h + 1) * D) for h in keep])
    dense = norm(x)[..., rows].reshape(-1, 1).double()
    cut = type(norm)(len(rows), eps=norm.variance_epsilon)
    cut.weight.copy_(norm.weight[rows])
    pruned = cut(x[..., rows]).reshape(-1, 1).double()
    return torch.linalg.lstsq(pruned, dense).solution.item()


@pytest.mark.parametrize("mode, steps", [("mha", 1), ("mha", 3), ("kv_groups", 1)])
def test_the_fitted_factor_is_the_brute_force_least_squares_one(mode, steps):
    model = tiny_olmo2(kv_heads=4 if mode == "mha" else 2)
    hidden = torch.randn(3, 10, 32)
    mask = torch.rand(30) > 0.3  # masked tokens count in neither
    site = observed_site(model, mode, hidden, mask)
    attention = site.attention
    decision = keep_first(site, steps)
    keep_q, keep_kv = site.kept_heads(decision)
    tokens = hidden.reshape(30, 32)[mask]
    expected = (brute_force_scale(attention.q_norm, attention.q_proj(tokens), keep_q),
                brute_force_scale(attention.k_norm, attention.k_proj(tokens), keep_kv))
    assert decision.norm_scales == pytest.approx(expected, rel=1e-6)
    assert all(abs(scale - 1) > 1e-3 for scale in decision.norm_scales)  # the heads' spread moves the RMS


def test_per_group_keeps_the_key_norm_and_cuts_the_query_norm_with_its_factor():
    model = tiny_olmo2(kv_heads=2)
    site = observed_site(model, "per_group", torch.randn(2, 12, 32))
    q_before, k_before = site.attention.q_norm.weight.clone(), site.attention.k_norm.weight.clone()
    decision = keep_first(site, 1)  # query heads 1 and 3 go, one from each KV group
    assert site.kept_heads(decision) == ([0, 2], [0, 1])
    assert decision.norm_scales[1] == 1.0  # every key head stays: the key RMS does not change
    site.apply(decision)
    kept = torch.cat([q_before[0:D], q_before[2 * D:3 * D]])
    assert torch.allclose(site.attention.q_norm.weight, kept * decision.norm_scales[0])
    assert torch.equal(site.attention.k_norm.weight, k_before)


@pytest.mark.parametrize("mode, steps", [("mha", 2), ("per_group", 1), ("per_group", 2), ("kv_groups", 1)])
def test_parameters_removed_count_the_norm_entries(mode, steps):
    model = tiny_olmo2(kv_heads=4 if mode == "mha" else 2)
    site = sites_of(model, "heads", mode)[0]
    layer = model.model.layers[0]
    before, counted = count_parameters(layer), site.num_params()
    planned = site.params_removed(steps)
    site.apply(site._placeholder_decision(steps, False))
    assert count_parameters(layer) == before - planned
    assert counted - site.num_params() == planned
    if mode == "per_group" and steps == 2:  # every query head gone: an EmptyAttention, its norms with it
        assert not hasattr(layer.self_attn, "q_norm")


def test_zero_heads_is_the_identity():
    model = tiny_olmo2()
    reference = logits(model)
    norms = [layer.self_attn.q_norm.weight.clone() for layer in model.model.layers]
    result = prune_quiet(model, targets=("heads",), sparsity=0.0)
    assert torch.equal(logits(result.model), reference)
    assert all(torch.equal(layer.self_attn.q_norm.weight, norm) for layer, norm in zip(result.model.model.layers,
                                                                                       norms))
    sums = torch.rand(50, 4, 2)
    assert norm_scale(sums, [0, 1, 2, 3], D, 1e-6) == 1.0  # every head kept: a_t = b_t


@torch.no_grad()
def kept_query_error(dense_model, pruned_model) -> float:
    """Σ over the calibration tokens of ‖normalised kept queries, pruned − dense‖² in layer 0 (before RoPE, which
    rotates both alike; OLMo 2 has no norm before the attention, so its input is the embeddings)."""
    dense, pruned = dense_model.model.layers[0].self_attn, pruned_model.model.layers[0].self_attn
    heads = [next(h for h in range(4) if torch.equal(pruned.q_proj.weight[j * D:(j + 1) * D],
                                                     dense.q_proj.weight[h * D:(h + 1) * D]))
             for j in range(pruned.q_proj.out_features // D)]  # the dense head each kept one is
    rows = torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads])
    hidden = dense_model.model.embed_tokens(calibration_ids())
    return (pruned.q_norm(pruned.q_proj(hidden)) - dense.q_norm(dense.q_proj(hidden))[..., rows]).square().sum().item()


def test_the_factor_fits_the_dense_queries_better_than_cutting_alone(monkeypatch):
    """On the calibration tokens, layer 0's kept queries after the norm are nearer the dense ones with the fitted
    factor than with the cut weights alone: it is their least-squares minimiser (§5.5)."""
    import copy

    dense = tiny_olmo2(spread=0.8)
    corrected = prune_quiet(copy.deepcopy(dense), targets=("heads",), sparsity=0.5).model
    monkeypatch.setattr(get_adapter(dense.config), "qk_norm_correction", False)
    plain = prune_quiet(copy.deepcopy(dense), targets=("heads",), sparsity=0.5).model
    assert corrected.model.layers[0].self_attn.q_proj.out_features == 2 * D
    assert kept_query_error(dense, corrected) < 0.99 * kept_query_error(dense, plain)


@pytest.mark.parametrize("mode, per_layer", [("mha", False), ("mha", True), ("per_group", True)])
def test_saved_model_reloads_in_a_fresh_process_to_the_same_logits(tmp_path, mode, per_layer):
    """Uniform heads: the stock Olmo2ForCausalLM without hf_snp (explicit head_dim). Per-layer heads: the hf_snp type,
    whose layers build their q_norm/k_norm with their own widths, without hf_snp (trust_remote_code) and with it."""
    out = tmp_path / "out"
    options = {"layer_sparsity": {0: 0.0, 1: 0.5, 2: 0.25}} if per_layer else {"sparsity": 0.5}
    gqa = {} if mode == "mha" else {"gqa_mode": mode}
    result = prune_quiet(tiny_olmo2(kv_heads=4 if mode == "mha" else 2), method="snp", targets=("mlp", "heads"),
                         output_dir=str(out), **options, **gqa)
    expected = logits(result.model)
    config = json.load(open(out / "config.json"))
    widths = [layer.self_attn.q_norm.weight.numel() for layer in result.model.model.layers]
    if not per_layer:
        assert config["model_type"] == "olmo2" and "auto_map" not in config
        assert (config["num_attention_heads"], config["head_dim"]) == (2, D) and widths == [2 * D] * 3
        got, name = reload_in_fresh_process(tmp_path, out, "", BLOCK_HF_SNP)
        assert name == "Olmo2ForCausalLM"
        assert torch.allclose(got, expected, atol=1e-5)
        return
    assert config["model_type"] == "hf_snp_olmo2" and len(set(widths)) > 1
    assert config["hf_snp_layout"]["attention"]["q_norm"] == "q_norm"
    for kwargs, block in (("trust_remote_code=True", BLOCK_HF_SNP), ("", "import hf_snp")):
        got, _ = reload_in_fresh_process(tmp_path, out, kwargs, block)
        assert torch.allclose(got, expected, atol=1e-5)
