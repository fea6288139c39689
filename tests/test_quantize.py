"""Prune, then quantize (issue 17): ``quantize=`` runs the pruned model through transformers' torchao integration.
Checked: the linear weights are torchao tensors and take fewer bytes, the quantized model stays close to the pruned
one and differs from it (quantization happened), the saved checkpoint (stock class, and the hf_snp type) reloads in a
fresh process to the same logits and greedy tokens, the card says so, and a missing torchao is refused before any
work."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import eval_ids, logits, prune_quiet, tiny_llama
from fresh_python import fresh_python

pytest.importorskip("torchao")

PROMPT = [[3, 4, 5, 6]]


def greedy(model) -> list:
    with torch.no_grad():
        return model.generate(torch.tensor(PROMPT), max_new_tokens=6, min_new_tokens=6, do_sample=False).tolist()


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic"])
@pytest.mark.parametrize("kind", ["uniform", "per_layer"])
def test_pruned_then_quantized_saves_and_reloads_in_a_fresh_process(kind, scheme, tmp_path):
    options = {} if kind == "uniform" else {"layer_sparsity": {0: 0.25, 1: 0.5, 2: 0.0, 3: 0.75}}
    pruned = prune_quiet(tiny_llama(), sparsity=0.5, **options)
    out = tmp_path / "out"
    result = prune_quiet(tiny_llama(), sparsity=0.5, quantize=scheme, output_dir=str(out), **options)
    down = result.model.model.layers[0].mlp.down_proj.weight
    assert type(down).__module__.startswith("torchao")
    quantization = result.report["quantization"]
    assert quantization["scheme"] == scheme
    assert quantization["weight_bytes_after"] < 0.8 * quantization["weight_bytes_before"]
    expected, reference = logits(result.model), logits(pruned.model)
    error = (expected - reference).norm() / reference.norm()
    assert 0 < error < 0.05  # quantized (not the same numbers), and close
    assert [layer["mlp_width"] for layer in result.report["layers"]] == [
        layer["mlp_width"] for layer in pruned.report["layers"]]
    assert "| quantization | " + scheme in (out / "README.md").read_text()
    torch.save(eval_ids(), tmp_path / "ids.pt")
    block = "import hf_snp" if kind == "per_layer" else "import torchao"
    reply = fresh_python(block).reload(out, str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"),
                                       generate={"prompt": PROMPT, "new": 6})
    assert reply["class"] == ("LlamaForCausalLM" if kind == "uniform" else "HfSnpLlamaForCausalLM")
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5)
    assert reply["tokens"] == greedy(result.model)


def test_missing_torchao_is_refused_before_any_work(monkeypatch, no_long_work):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ImportError, match=r"quantize='int8_weight_only' needs torchao: pip install"):
        prune_quiet(tiny_llama(), sparsity=0.3, quantize="int8_weight_only")


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match=r"unknown quantize 'fp3'; choose one of"):
        prune_quiet(tiny_llama(), sparsity=0.3, quantize="fp3")
