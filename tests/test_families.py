"""Llama-like families beyond Llama, Mistral and Qwen2 (issue 14): Qwen3, Gemma, Gemma 2, Gemma 3 (text), OLMo 2,
Granite, SmolLM3. Tiny from-config models (conftest.TINY_LLAMA_LIKE): exactness on planted redundancy (MLP neurons
and heads, both GQA modes; OLMo 2's heads with their entries of its whole-projection q/k norms), the second pass's
replay, every block fed its own layer type's inputs, and save/reload in fresh processes (stock class; the
variable-width type without hf_snp and with it), greedy generation from the reloaded model equal to the in-memory
one's."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    TINY_LLAMA_LIKE,
    VOCAB,
    calibration_ids,
    eval_ids,
    logits,
    make_scaled_copies,
    prune_quiet,
    sites_of,
    sparsity_removing,
)

FAMILIES = list(TINY_LLAMA_LIKE)
HEAD_FAMILIES = FAMILIES  # OLMo 2's q/k norms span every head: its heads are cut with their norm entries
COPIES = 12  # of 48 MLP neurons
PROMPT = [[3, 4, 5, 6]]
NEW_TOKENS = 8
BLOCK_HF_SNP = "sys.modules['hf_snp'] = None  # import hf_snp now raises ImportError"
STOCK_CLASS = {"qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
               "gemma3_text": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "granite": "GraniteForCausalLM",
               "smollm3": "SmolLM3ForCausalLM"}
# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", FAMILIES)
def test_snp_mlp_exact_when_removed_neurons_are_scaled_copies(family):
    model = TINY_LLAMA_LIKE[family]()
    make_scaled_copies(model, COPIES)
    reference = logits(model)
    sparsity = sparsity_removing(model, COPIES)
    result = prune_quiet(copy.deepcopy(model), method="snp", sparsity=sparsity)
    assert [layer["mlp_width"] for layer in result.report["layers"]] == [48 - COPIES] * 4
    assert result.report["save_format"] == "stock"
    assert (logits(result.model) - reference).abs().max() < 1e-4
    baseline = prune_quiet(model, method="random", sparsity=sparsity)  # not vacuous: no reconstruction moves them
    assert (logits(baseline.model) - reference).abs().max() > 1e-2


@torch.no_grad()
def make_redundant_heads(model, mode: str) -> None:
    """One removal step of ``mode`` removes these exactly, in every layer (4 query heads on 2 KV heads).

    per_group: query head 1 copies head 0 and head 3 copies head 2 (same KV head, same output).
    kv_groups: KV head 1 is KV head 0 with values x0.7 and query heads 2, 3 copy 0, 1: group 1 = 0.7 x group 0.
    Per-head q/k norms (Qwen3, Gemma 3) are shared by every head, so copies stay copies after them. OLMo 2's q/k
    norms over the whole projection get the copied heads' weight entries copied too; every kept head then counts
    twice in the RMS over all heads, so the RMS over the kept heads is the same and the copies stay exact."""
    for site in sites_of(model, "heads", mode):
        q, k, v = (getattr(site.attention, name) for name in (site.layout.q, site.layout.k, site.layout.v))
        q_norm, k_norm = (getattr(site.attention, name) if name else None
                          for name in (site.layout.q_norm, site.layout.k_norm))
        d = site.head_dim

        def copy_rows(linear, src: int, dst: int, scale: float = 1.0, norm=None) -> None:
            linear.weight[dst * d:(dst + 1) * d] = scale * linear.weight[src * d:(src + 1) * d]
            if linear.bias is not None:
                linear.bias[dst * d:(dst + 1) * d] = scale * linear.bias[src * d:(src + 1) * d]
            if norm is not None:
                norm.weight[dst * d:(dst + 1) * d] = norm.weight[src * d:(src + 1) * d]

        if mode == "per_group":
            copy_rows(q, 0, 1, norm=q_norm)
            copy_rows(q, 2, 3, norm=q_norm)
        else:
            copy_rows(q, 0, 2, norm=q_norm)
            copy_rows(q, 1, 3, norm=q_norm)
            copy_rows(k, 0, 1, norm=k_norm)
            copy_rows(v, 0, 1, 0.7)


@pytest.mark.parametrize("mode", ["per_group", "kv_groups"])
@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_snp_heads_exact_when_removed_heads_are_copies(family, mode):
    model = TINY_LLAMA_LIKE[family]()
    make_redundant_heads(model, mode)
    reference = logits(model)
    site = sites_of(model, "heads", mode)[0]
    sparsity = site.params_removed(1) / site.num_params()
    result = prune_quiet(copy.deepcopy(model), method="snp", targets=("heads",), sparsity=sparsity, gqa_mode=mode)
    heads = (2, 2) if mode == "per_group" else (2, 1)
    assert [(layer["num_heads"], layer["num_kv_heads"]) for layer in result.report["layers"]] == [heads] * 4
    attention = result.model.model.layers[0].self_attn
    assert attention.num_key_value_groups == heads[0] // heads[1]
    assert (logits(result.model) - reference).abs().max() < 1e-4
    baseline = prune_quiet(model, method="random", targets=("heads",), sparsity=sparsity, gqa_mode=mode)
    assert (logits(baseline.model) - reference).abs().max() > 1e-2


def test_olmo2_heads_cut_their_q_k_norm_entries():
    """OLMo 2's heads were refused before issue 28: now each layer's q_norm/k_norm keep the kept heads' entries
    (kv_groups: 2 of 4 query heads, 1 of 2 KV heads), rescaled by the fitted factor (hf_snp.units.qk_norm)."""
    model = TINY_LLAMA_LIKE["olmo2"]()
    dense = model.model.layers[0].self_attn
    q_before, k_before = dense.q_norm.weight.detach().clone(), dense.k_norm.weight.detach().clone()
    result = prune_quiet(model, targets=("mlp", "heads"), sparsity=0.3, gqa_mode="kv_groups")
    attention = result.model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 16 and attention.q_norm.weight.shape == (16,)
    assert attention.k_proj.out_features == 8 and attention.k_norm.weight.shape == (8,)
    for norm, before in ((attention.q_norm, q_before), (attention.k_norm, k_before)):  # one kept block, one factor
        kept = [before[start:start + norm.weight.numel()] for start in range(0, before.numel(), norm.weight.numel())]
        ratios = [norm.weight.detach() / block for block in kept]
        assert any(torch.allclose(r, r[0].expand_as(r), rtol=1e-5) and abs(r[0] - 1) < 0.5 for r in ratios)


@pytest.mark.parametrize("family", FAMILIES)
def test_second_pass_replay_matches_recomputing(family, monkeypatch):
    """The families' norms and multipliers sit outside the attention and MLP modules, so the replayed attention
    output and the MLP computed from its cached kept activations give the next blocks the same inputs."""
    import hf_snp.passes.replay

    model = TINY_LLAMA_LIKE[family]()
    chosen = []
    original = hf_snp.passes.replay.ReplayCache.for_block.__func__
    monkeypatch.setattr(hf_snp.passes.replay.ReplayCache, "for_block",
                        classmethod(lambda cls, *args: chosen.append(original(cls, *args)) or chosen[-1]))
    replayed = prune_quiet(copy.deepcopy(model), method="vbp", sparsity=0.4)
    assert len(chosen) == 3 and all(cache.mlp_site is not None and cache.attention is not None for cache in chosen)
    monkeypatch.setattr(hf_snp.passes.replay.ReplayCache, "for_block",
                        classmethod(lambda cls, adapter, block, active, tokens, size, store, device:
                                    cls(None, None, store, device)))  # nothing replayed: every block run again
    recomputed = prune_quiet(model, method="vbp", sparsity=0.4)
    for (name, a), (_, b) in zip(replayed.model.state_dict().items(), recomputed.model.state_dict().items()):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), name
    assert torch.allclose(logits(replayed.model), logits(recomputed.model), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_sees_the_hidden_states_of_the_model(family):
    """Pruning nothing, the engine's per-block pass reproduces the model's own hidden states at every block
    (each layer type's attention mask and rotary embeddings reach the blocks of that type)."""
    model = TINY_LLAMA_LIKE[family]()
    calib = calibration_ids()
    with torch.no_grad():
        expected = model(calib, output_hidden_states=True).hidden_states
    seen: dict[int, list[torch.Tensor]] = {}
    handles = [layer.register_forward_hook(lambda module, args, out, i=i: seen.setdefault(i, []).append(out))
               for i, layer in enumerate(model.model.layers)]
    try:
        prune_quiet(model, sparsity=0.0, calibration=calib)
    finally:
        for handle in handles:
            handle.remove()
    for index in range(len(model.model.layers) - 1):  # the last block's outputs are not recomputed
        # the last outputs are the pass's (capturing the inputs passes the blocks through first)
        got = torch.cat(seen[index])[-len(calib):]
        assert torch.allclose(got, expected[index + 1], atol=1e-5), f"block {index}"


def test_gemma2_head_counts_its_config_refuses_save_as_the_variable_width_type(tmp_path):
    """Gemma 2 and 3 configs require hidden_size % num_attention_heads == 0: 3 heads of 4 (uniform) cannot be
    written in the stock fields, so the result is the variable-width type."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    result = prune_quiet(Gemma2ForCausalLM(config).eval(), targets=("heads",), sparsity=0.25,
                         output_dir=str(tmp_path / "out"))
    assert [(layer["num_heads"], layer["num_kv_heads"]) for layer in result.report["layers"]] == [(3, 3)] * 2
    assert result.report["save_format"] == "hf_snp"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == "HfSnpGemma2ForCausalLM"
    assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-5)


@pytest.mark.parametrize("family", ["smollm3", "qwen3", "gemma2", "gemma3_text"])
def test_removing_a_block_saves_per_layer_config_fields_that_rebuild_the_model(family, tmp_path):
    """Block 1 made an identity (no attention or MLP output) is the block removed; the saved config's per-layer
    fields (layer types: sliding or full attention; SmolLM3's layers without rotary embeddings) follow the kept
    blocks, so the reloaded model equals the pruned one, which equals the dense one."""
    from transformers import AutoModelForCausalLM

    model = TINY_LLAMA_LIKE[family]()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    reference = logits(model)
    result = prune_quiet(model, targets=("blocks",), sparsity=0.25, output_dir=str(tmp_path / "out"))
    assert [layer["source_layer"] for layer in result.report["layers"]] == [0, 2, 3]
    assert torch.allclose(logits(result.model), reference, atol=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(logits(reloaded), reference, atol=1e-5)


# ---------------------------------------------------------------------------------------------- save and reload

# one child interpreter per setup reloads every saved model: logits on eval_ids() and greedy tokens
RELOADER = r"""
import json, sys
{block}
import torch
import transformers

torch.set_num_threads(1)  # tiny models; the two children and the test process share the cores
jobs, results = json.loads(sys.stdin.read()), []
for job in jobs:
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        del sys.modules[name]
    model = transformers.AutoModelForCausalLM.from_pretrained(job["path"], **job["kwargs"]).eval()
    with torch.no_grad():
        torch.save(model(torch.load(job["ids"])).logits, job["out"])
        tokens = model.generate(torch.tensor(job["prompt"]), max_new_tokens=job["new"], min_new_tokens=job["new"],
                                do_sample=False)
    results.append({{"class": type(model).__name__, "tokens": tokens.tolist(),
                    "hf_snp_loaded": sys.modules.get("hf_snp") is not None}})
print("@@results@@" + json.dumps(results))
"""


def greedy(model) -> list:
    with torch.no_grad():
        tokens = model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False)
    return tokens.tolist()


def uniform_case(family: str, out: str):
    """Same widths in every layer: MLP 48 -> 24 and one head step (per_group or kv_groups) -> the stock class."""
    mode = "kv_groups" if HEAD_FAMILIES.index(family) % 2 else "per_group"
    return prune_quiet(TINY_LLAMA_LIKE[family](layers=3), method="snp", targets=("mlp", "heads"), sparsity=0.5,
                       gqa_mode=mode, output_dir=out)


def per_layer_case(family: str, out: str):
    """Per-layer widths, VBP's added biases, and (with heads) layer 2 (sliding-window where the family has them)
    losing every head: an EmptyAttention."""
    mode = "per_group" if HEAD_FAMILIES.index(family) % 2 else "kv_groups"
    return prune_quiet(TINY_LLAMA_LIKE[family](layers=3), method="vbp", targets=("mlp", "heads"), sparsity=0.3,
                       gqa_mode=mode, layer_sparsity={0: 0.0, 2: 0.999}, output_dir=out)


def reload_all(jobs: dict[str, list[dict]], scratch: str) -> dict[str, list[dict]]:
    """Run each setup's jobs in one fresh interpreter that starts with the setup's line (all at once)."""
    env = {**os.environ, "HF_MODULES_CACHE": os.path.join(scratch, "modules")}
    children = {block: subprocess.Popen([sys.executable, "-c", textwrap.dedent(RELOADER.format(block=block))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env)
                for block, block_jobs in jobs.items() if block_jobs}
    replies = {}
    for block, child in children.items():
        out, err = child.communicate(json.dumps(jobs[block]))
        if child.returncode != 0:
            raise AssertionError(f"reload in a fresh process ({block!r}) failed:\n{err[-4000:]}")
        replies[block] = json.loads(out.split("@@results@@")[-1])
    return replies


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every family pruned both ways and saved; each saved model reloaded in fresh processes: without hf_snp
    (the stock class plainly, the variable-width type with trust_remote_code=True) and after import hf_snp
    (the variable-width type without trust_remote_code). A case that could not be pruned keeps its error."""
    root = tmp_path_factory.mktemp("families")
    ids = str(root / "ids.pt")
    torch.save(eval_ids(), ids)
    cases, jobs = {}, {BLOCK_HF_SNP: [], "import hf_snp": []}
    for family in FAMILIES:
        for kind, prune in (("uniform", uniform_case), ("per_layer", per_layer_case)):
            out = str(root / f"{family}-{kind}")
            try:
                result = prune(family, out)
            except Exception as error:  # noqa: BLE001 - kept for the test of this case
                cases[family, kind] = {"error": error}
                continue
            config = json.load(open(os.path.join(out, "config.json")))
            case = cases[family, kind] = {"result": result, "logits": logits(result.model), "config": config,
                                          "tokens": greedy(result.model), "reloads": {}}
            if kind == "per_layer" and any(layer.get("num_heads") == 0 for layer in result.report["layers"]):
                with torch.no_grad():
                    uncached = result.model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS,
                                                     min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
                case["uncached_tokens"] = uncached.tolist()
            setups = [(BLOCK_HF_SNP, {})] if kind == "uniform" else [
                (BLOCK_HF_SNP, {"trust_remote_code": True}), ("import hf_snp", {})]
            for block, kwargs in setups:
                job = {"path": out, "kwargs": kwargs, "ids": ids, "prompt": PROMPT, "new": NEW_TOKENS,
                       "out": str(root / f"{family}-{kind}-{len(jobs[block])}-{bool(kwargs)}.pt")}
                jobs[block].append(job)
                case["reloads"][block] = job
    for block, replies in reload_all(jobs, str(root)).items():
        for job, reply in zip(jobs[block], replies):
            job["reply"], job["logits"] = reply, torch.load(job["out"])
    return cases


def case_of(saved, family: str, kind: str) -> dict:
    case = saved[family, kind]
    if "error" in case:
        raise case["error"]
    return case


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_result_saves_as_the_stock_class_and_reloads_without_hf_snp(saved, family):
    case = case_of(saved, family, "uniform")
    config, report = case["config"], case["result"].report
    assert report["save_format"] == "stock"
    assert config["model_type"] == family and "auto_map" not in config and "hf_snp_layers" not in config
    assert config["intermediate_size"] == 24
    if family in HEAD_FAMILIES:
        heads = (report["layers"][0]["num_heads"], report["layers"][0]["num_kv_heads"])
        assert heads in ((2, 2), (2, 1))
        head_dim = 16 if family.startswith("gemma") else 8  # Gemma's explicit head_dim > hidden / heads
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (*heads, head_dim)
    reload = case["reloads"][BLOCK_HF_SNP]
    assert reload["reply"]["class"] == STOCK_CLASS[family] and not reload["reply"]["hf_snp_loaded"]
    assert torch.allclose(reload["logits"], case["logits"], atol=1e-5)
    assert reload["reply"]["tokens"] == case["tokens"]


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_result_reloads_without_hf_snp_and_with_it(saved, family):
    case = case_of(saved, family, "per_layer")
    config, report = case["config"], case["result"].report
    assert report["save_format"] == "hf_snp" and config["model_type"] == f"hf_snp_{family}"
    assert [spec.get("intermediate_size") for spec in config["hf_snp_layers"]] == [
        layer["mlp_width"] for layer in report["layers"]]
    assert any(layer["mlp_output_bias_added"] for layer in report["layers"])  # VBP's mean shift
    if family in HEAD_FAMILIES:
        assert report["layers"][2]["num_heads"] == 0 and config["hf_snp_layers"][2]["num_attention_heads"] == 0
        assert case["uncached_tokens"] == case["tokens"]  # the headless layer still advances the KV cache
    for block, reload in case["reloads"].items():
        assert reload["reply"]["hf_snp_loaded"] == (block == "import hf_snp")
        assert reload["reply"]["class"] == f"HfSnp{STOCK_CLASS[family]}"
        assert torch.allclose(reload["logits"], case["logits"], atol=1e-5), block
        assert reload["reply"]["tokens"] == case["tokens"], block
