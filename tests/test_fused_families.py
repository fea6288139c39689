"""Families with fused projections or transposed weights (issue 14, the layout vocabulary): Phi-3 (``qkv_proj`` =
[q; k; v] rows, ``gate_up_proj`` = [gate; up], GQA), GPT-NeoX (``query_key_value`` rows per head [q_h; k_h; v_h],
parallel residual) and GPT-2 (``Conv1D`` modules, weight [in, out]; ``c_attn`` = [q | k | v] columns).

Tiny from-config models (hidden 32, 3 layers, 4 heads, vocab 96). The redundancy planted here addresses the fused
rows by hand, from the transformers forward code (not through hf_snp's layouts), so exactness checks the layouts
against the real computation."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
from conftest import VOCAB, eval_ids, logits, prune_quiet, sites_of, sparsity_removing
from fresh_python import fresh_python
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from hf_snp.models.modeling_hf_snp import AttentionLayout, MlpLayout
from hf_snp.units.removal import Decision
from hf_snp.units.surgery import fold_into_consumer, keep_rows

D = 8  # head_dim: hidden 32, 4 heads
LAYERS = 3
PROMPT = [[3, 4, 5, 6]]
NEW_TOKENS = 6
BLOCK_HF_SNP = "sys.modules['hf_snp'] = None  # import hf_snp now raises ImportError"


@torch.no_grad()
def _with_biases(model):
    """Stock init zeroes biases: give them values (MLP producers around +0.5 so that every ReLU fires)."""
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.normal_(0.5 if ("dense_h_to_4h" in name or "c_fc" in name) else 0.0, 0.2)
    return model.eval()


def tiny_phi3(seed: int = 0):
    """4 query heads on 2 KV heads (GQA), MLP 48, no biases."""
    torch.manual_seed(seed)
    config = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(config).eval()


def tiny_gpt_neox(seed: int = 0, parallel: bool = True):
    """MLP 48, ReLU (so scaled copies of a neuron are exact), partial rotary (a quarter of each head)."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                           num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2,
                           hidden_act="relu", use_parallel_residual=parallel, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    return _with_biases(GPTNeoXForCausalLM(config))


def tiny_gpt2(seed: int = 0):
    """n_inner None (MLP 4 * 32 = 128), ReLU, tied embeddings."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                        initializer_range=0.2, activation_function="relu", bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    return _with_biases(GPT2LMHeadModel(config))


TINY = {"phi3": tiny_phi3, "gpt_neox": tiny_gpt_neox, "gpt2": tiny_gpt2}
FAMILIES = list(TINY)
STOCK_CLASS = {"phi3": "Phi3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "gpt2": "GPT2LMHeadModel"}
MLP_WIDTH = {"phi3": 48, "gpt_neox": 48, "gpt2": 128}
CONV1D = {"gpt2"}


# ---------------------------------------------------------------------------------------------- planting


def _units(weight: torch.Tensor, rows: slice, conv1d: bool) -> torch.Tensor:
    """The weight entries of output units ``rows`` (a Conv1D's weight is [in, out]: columns)."""
    return weight[:, rows] if conv1d else weight[rows]


@torch.no_grad()
def _copy_units(module, src: slice, dst: slice, scale: float, conv1d: bool) -> None:
    if conv1d:
        module.weight[:, dst] = scale * module.weight[:, src]
    else:
        module.weight[dst] = scale * module.weight[src]
    if module.bias is not None:
        module.bias[dst] = scale * module.bias[src]


def _block(start: int, size: int = D) -> slice:
    return slice(start, start + size)


def qkv_slice(family: str, part: str, head: int, heads: int = 4, kv_heads: int = 4) -> slice:
    """Rows (GPT-2: columns) of one head's query, key or value in the fused projection, per the transformers code:
    Phi-3 ``qkv[..., :H*d]`` / ``[H*d : H*d + KV*d]`` / rest; GPT-2 ``split(split_size)``; GPT-NeoX
    ``view(..., heads, 3 * head_size).chunk(3)``."""
    index = "qkv".index(part)
    if family == "gpt_neox":
        return _block(head * 3 * D + index * D)
    starts = {"q": 0, "k": heads * D, "v": (heads + kv_heads) * D}
    return _block(starts[part] + head * D)


@torch.no_grad()
def make_scaled_copies(model, family: str, copies: int) -> None:
    """The last ``copies`` MLP neurons of each layer become positive multiples of the first ones (Phi-3: same gate
    row, up row times c; ReLU families: producer row and bias times c)."""
    for site in sites_of(model, "mlp"):
        (producer,), width = site.producer_linears, site.num_units
        for k in range(copies):
            src, dst, scale = k, width - copies + k, 0.5 + 0.25 * k
            if family == "phi3":  # [gate; up]
                _copy_units(producer, slice(src, src + 1), slice(dst, dst + 1), 1.0, False)
                _copy_units(producer, slice(width + src, width + src + 1), slice(width + dst, width + dst + 1),
                            scale, False)
            else:
                _copy_units(producer, slice(src, src + 1), slice(dst, dst + 1), scale, family in CONV1D)


@torch.no_grad()
def make_redundant_heads(model, family: str, mode: str) -> None:
    """One removal step of ``mode`` removes these exactly: multi-head (GPT-NeoX, GPT-2): head 3 is head 1 with
    values x0.7. Phi-3 per_group: query head 1 copies 0 and 3 copies 2 (same KV heads); kv_groups: KV head 1 is
    KV head 0 with values x0.7 and query heads 2, 3 copy 0, 1."""
    conv1d = family in CONV1D
    for site in sites_of(model, "heads", mode):
        qkv = getattr(site.attention, site.layout.q)
        heads, kv_heads = (4, 2) if family == "phi3" else (4, 4)

        def copy(part: str, src: int, dst: int, scale: float = 1.0) -> None:
            _copy_units(qkv, qkv_slice(family, part, src, heads, kv_heads),
                        qkv_slice(family, part, dst, heads, kv_heads), scale, conv1d)

        if family != "phi3":
            copy("q", 1, 3)
            copy("k", 1, 3)
            copy("v", 1, 3, 0.7)
        elif mode == "per_group":
            copy("q", 0, 1)
            copy("q", 2, 3)
        else:
            copy("q", 0, 2)
            copy("q", 1, 3)
            copy("k", 0, 1)
            copy("v", 0, 1, 0.7)


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", FAMILIES)
def test_snp_mlp_exact_when_removed_neurons_are_scaled_copies(family):
    model = TINY[family]()
    copies = MLP_WIDTH[family] // 4
    make_scaled_copies(model, family, copies)
    reference = logits(model)
    sparsity = sparsity_removing(model, copies)
    result = prune_quiet(copy.deepcopy(model), method="snp", sparsity=sparsity)
    assert [layer["mlp_width"] for layer in result.report["layers"]] == [MLP_WIDTH[family] - copies] * LAYERS
    assert result.report["save_format"] == "stock"
    assert (logits(result.model) - reference).abs().max() < 1e-4
    baseline = prune_quiet(model, method="random", sparsity=sparsity)  # not vacuous: no reconstruction moves them
    assert (logits(baseline.model) - reference).abs().max() > 1e-2


HEAD_CASES = [("phi3", "per_group"), ("phi3", "kv_groups"), ("gpt_neox", "per_group"), ("gpt2", "per_group")]


@pytest.mark.parametrize("family, mode", HEAD_CASES)
def test_snp_heads_exact_when_removed_heads_are_combinations(family, mode):
    model = TINY[family]()
    make_redundant_heads(model, family, mode)
    reference = logits(model)
    site = sites_of(model, "heads", mode)[0]
    sparsity = site.params_removed(1) / site.num_params()
    result = prune_quiet(copy.deepcopy(model), method="snp", targets=("heads",), sparsity=sparsity, gqa_mode=mode)
    heads = {"per_group": (2, 2), "kv_groups": (2, 1)}[mode] if family == "phi3" else (3, 3)
    assert [(layer["num_heads"], layer["num_kv_heads"]) for layer in result.report["layers"]] == [heads] * LAYERS
    assert (logits(result.model) - reference).abs().max() < 1e-4
    baseline = prune_quiet(model, method="random", targets=("heads",), sparsity=sparsity, gqa_mode=mode)
    assert (logits(baseline.model) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_sparsity_is_the_identity(family):
    model = TINY[family]()
    before = logits(model)
    result = prune_quiet(model, targets=("mlp", "heads"), sparsity=0.0)
    assert torch.equal(logits(result.model), before)
    assert result.report["params_removed"] == 0 and result.report["save_format"] == "stock"


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel-residual", "sequential"])
def test_gpt_neox_replay_matches_recomputing(parallel, monkeypatch):
    """MLP-only cuts replay the attention output and the MLP's consumer: with the parallel residual the MLP reads
    the block input, and the replayed block output is still the recomputed one."""
    import hf_snp.passes.replay

    model = tiny_gpt_neox(parallel=parallel)
    chosen = []
    original = hf_snp.passes.replay.ReplayCache.for_block.__func__
    monkeypatch.setattr(hf_snp.passes.replay.ReplayCache, "for_block",
                        classmethod(lambda cls, *args: chosen.append(original(cls, *args)) or chosen[-1]))
    replayed = prune_quiet(copy.deepcopy(model), method="snp", sparsity=0.4)
    assert all(cache.mlp_site is not None and cache.attention is not None for cache in chosen) and chosen
    monkeypatch.setattr(hf_snp.passes.replay.ReplayCache, "for_block",
                        classmethod(lambda cls, adapter, block, active, tokens, size, store, device:
                                    cls(None, None, store, device)))
    recomputed = prune_quiet(model, method="snp", sparsity=0.4)
    for (name, a), (_, b) in zip(replayed.model.state_dict().items(), recomputed.model.state_dict().items()):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), name


# ---------------------------------------------------------------------------------------------- vocabulary


def test_conv1d_cuts_match_the_linear_cuts():
    """keep_rows / fold_into_consumer on a Conv1D (weight [in, out]) equal the same cuts on its nn.Linear twin."""
    torch.manual_seed(0)
    conv, linear = Conv1D(6, 5), torch.nn.Linear(5, 6)
    with torch.no_grad():
        conv.bias.normal_()
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    x = torch.randn(3, 5)
    keep, drop = torch.tensor([0, 2, 4]), torch.tensor([1, 3])
    decision = Decision(keep, drop, coef=torch.randn(2, 3, dtype=torch.float64),
                        shift=torch.randn(2, dtype=torch.float64))
    fold_into_consumer(conv, decision, transposed=True)
    fold_into_consumer(linear, decision)
    assert (conv.nx, conv.nf) == (3, 6) and torch.allclose(conv(x[:, keep]), linear(x[:, keep]), atol=1e-6)
    rows = torch.tensor([5, 0, 2])
    keep_rows(conv, rows, transposed=True)
    keep_rows(linear, rows)
    assert conv.nf == 3 and torch.allclose(conv(x[:, keep]), linear(x[:, keep]), atol=1e-6)


def test_layouts_round_trip_and_old_layouts_load():
    """config.hf_snp_layout holds the layouts as dicts (dataclasses.asdict); fields missing from a layout saved
    before the vocabulary existed take their defaults."""
    from hf_snp.models.layouts import GPT2_ATTENTION, GPT2_MLP, PHI3_ATTENTION, PHI3_MLP

    for layout in (PHI3_MLP, GPT2_MLP):
        assert MlpLayout.from_dict(json.loads(json.dumps(dataclasses.asdict(layout)))) == layout
    for layout in (PHI3_ATTENTION, GPT2_ATTENTION):
        assert AttentionLayout(**json.loads(json.dumps(dataclasses.asdict(layout)))) == layout
    old = MlpLayout.from_dict({"parent": "mlp", "producers": ["gate_proj", "up_proj"], "consumer": "down_proj"})
    assert old.producer_blocks == 1 and not old.conv1d
    old = AttentionLayout(**{"parent": "self_attn", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"})
    assert old.qkv == "separate" and not old.conv1d and not old.config_heads
    with pytest.raises(ValueError, match="qkv must be one of"):
        AttentionLayout("a", "q", "q", "q", "o", qkv="interleaved")


def test_phi3_pruned_attention_splits_its_own_rows():
    """Phi-3 splits qkv at config.num_attention_heads * head_dim: a layer with fewer heads reads its own count
    (a per-layer view of the config) while the model's config and the other layers keep theirs."""
    model = tiny_phi3()
    result = prune_quiet(model, targets=("heads",), sparsity=0.5, layer_sparsity={0: 0.0})
    attentions = [layer.self_attn for layer in result.model.model.layers]
    assert result.report["save_format"] == "hf_snp"
    assert attentions[0].config is result.model.config and result.model.config.num_attention_heads == 4
    assert [a.config.num_attention_heads for a in attentions] == [4, 2, 2]
    assert [a.qkv_proj.out_features for a in attentions] == [64, 48, 48]  # (heads + 2 KV heads) * 8
    assert attentions[1].config._attn_implementation == result.model.config._attn_implementation


def test_a_model_with_a_headless_layer_prunes_again():
    """An EmptyAttention (every head gone, GPT-2's Conv1D output projection keeps only its bias) is a site with
    nothing left to remove; the other layers prune again."""
    first = prune_quiet(tiny_gpt2(), targets=("mlp", "heads"), sparsity=0.3, layer_sparsity={1: 0.999})
    second = prune_quiet(first.model, targets=("mlp", "heads"), sparsity=0.3)
    assert [layer["num_heads"] for layer in second.report["layers"]] == [2, 0, 2]
    assert torch.isfinite(logits(second.model)).all()


# ---------------------------------------------------------------------------------------------- save and reload


def _greedy(model) -> list:
    with torch.no_grad():
        return model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False).tolist()


def _reload(tmp_path, out, kwargs: str, block: str) -> dict:
    ids, logits_file = str(tmp_path / "ids.pt"), str(tmp_path / f"logits-{len(os.listdir(tmp_path))}.pt")
    torch.save(eval_ids(), ids)
    reply = fresh_python(block).reload(out, ids, logits_file, kwargs, generate={"prompt": PROMPT, "new": NEW_TOKENS})
    reply["logits"] = torch.load(logits_file)
    return reply


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_result_saves_as_the_stock_class_and_reloads_without_hf_snp(tmp_path, family):
    """Uniform MLP widths (and for Phi-3, whose config takes an explicit head_dim, uniform heads) are the stock
    class; GPT-2's MLP width goes to n_inner."""
    out = tmp_path / "out"
    targets = ("mlp", "heads") if family == "phi3" else ("mlp",)
    result = prune_quiet(TINY[family](), method="snp", targets=targets, sparsity=0.5, output_dir=str(out))
    assert result.report["save_format"] == "stock"
    config = json.load(open(out / "config.json"))
    assert config["model_type"] == family and "auto_map" not in config and "hf_snp_layers" not in config
    width_field = "n_inner" if family == "gpt2" else "intermediate_size"
    assert config[width_field] == MLP_WIDTH[family] // 2
    if family == "phi3":
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, D)
    reply = _reload(tmp_path, out, "", BLOCK_HF_SNP)
    assert reply["class"] == STOCK_CLASS[family] and not reply["hf_snp_loaded"]
    assert torch.allclose(reply["logits"], logits(result.model), atol=1e-5)
    assert reply["tokens"] == _greedy(result.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_result_saves_as_the_hf_snp_type_and_reloads(tmp_path, family):
    """Per-layer widths and head counts, layer 1 losing every head (an EmptyAttention), VBP's added biases where a
    consumer had none (Phi-3): parameter counts equal the report, the hf_snp type reloads without hf_snp
    (trust_remote_code=True) and with it, and greedy generation (through the KV cache) matches."""
    out = tmp_path / "out"
    model = TINY[family]()
    before = sum(p.numel() for p in model.parameters())
    mode = "kv_groups" if family == "phi3" else "per_group"
    result = prune_quiet(model, method="vbp", targets=("mlp", "heads"), sparsity=0.3, gqa_mode=mode,
                         layer_sparsity={0: 0.0, 1: 0.999}, output_dir=str(out))
    report = result.report
    assert report["params_removed"] == before - sum(p.numel() for p in result.model.parameters())
    assert report["save_format"] == "hf_snp" and [layer["num_heads"] for layer in report["layers"]][:2] == [4, 0]
    assert report["layers"][2]["num_heads"] < 4 and report["layers"][2]["mlp_width"] < MLP_WIDTH[family]
    config = json.load(open(out / "config.json"))
    assert config["model_type"] == f"hf_snp_{family}" and os.path.exists(out / "modeling_hf_snp.py")
    assert [spec.get("intermediate_size") for spec in config["hf_snp_layers"]] == [
        layer["mlp_width"] for layer in report["layers"]]
    assert config["hf_snp_layout"]["attention"]["qkv"] == {"phi3": "blocks", "gpt_neox": "per_head",
                                                          "gpt2": "blocks"}[family]
    expected, tokens = logits(result.model), _greedy(result.model)
    with torch.no_grad():  # the headless layer still advances the KV cache
        assert result.model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                     do_sample=False, use_cache=False).tolist() == tokens
    for kwargs, block in (("trust_remote_code=True", BLOCK_HF_SNP), ("", "import hf_snp")):
        reply = _reload(tmp_path, out, kwargs, block)
        assert reply["class"] == f"HfSnp{STOCK_CLASS[family]}" and reply["hf_snp_loaded"] == (block != BLOCK_HF_SNP)
        assert torch.allclose(reply["logits"], expected, atol=1e-5), block
        assert reply["tokens"] == tokens, block
