"""Saved models reload to the same logits: stock class and hf_snp type, in a fresh process."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TINY, eval_ids, logits, prune_quiet
from fresh_python import fresh_python

from hf_snp.deliver.report import REPORT_NAME

BLOCK_HF_SNP = "sys.modules['hf_snp'] = None  # import hf_snp now raises ImportError"


def reload_in_fresh_process(tmp_path, path, kwargs: str, block: str = "") -> tuple[torch.Tensor, str]:
    """AutoModelForCausalLM.from_pretrained(path, kwargs) in a process that started with ``block``
    (one such process serves every reload of the session: fresh_python.py)."""
    ids_file, out_file = str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")
    torch.save(eval_ids(), ids_file)
    reply = fresh_python(block).reload(path, ids_file, out_file, kwargs)
    if block == BLOCK_HF_SNP:
        assert not reply["hf_snp_loaded"]
    if block == "import hf_snp" and "trust_remote_code" not in kwargs and reply["class"].startswith("HfSnp"):
        assert reply["module"].startswith("hf_snp.")  # hf_snp's own class, not a checkpoint's code file
    return torch.load(out_file), reply["class"]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_uniform_widths_save_as_the_stock_class(tmp_path, family):
    result = prune_quiet(TINY[family](), method="snp", sparsity=0.3, allocation="uniform",
                         output_dir=str(tmp_path / "out"))
    expected = logits(result.model)
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["model_type"] == family and "auto_map" not in config
    assert os.path.exists(tmp_path / "out" / "model.safetensors")
    assert not any(name.endswith(".py") for name in os.listdir(tmp_path / "out"))
    got, class_name = reload_in_fresh_process(tmp_path, tmp_path / "out", "", BLOCK_HF_SNP)
    assert class_name in ("LlamaForCausalLM", "OPTForCausalLM")
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", ["snp", "vbp"])
def test_per_layer_widths_save_as_the_hf_snp_type(tmp_path, family, method):
    out = tmp_path / "out"
    result = prune_quiet(TINY[family](), method=method, sparsity=0.25, layer_sparsity=[0.0, 0.5, 0.25, 0.1],
                         output_dir=str(out))
    expected = logits(result.model)
    config = json.load(open(out / "config.json"))
    assert config["model_type"] == f"hf_snp_{family}"
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_hf_snp.{type(result.model).__name__}"
    assert [spec["intermediate_size"] for spec in config["hf_snp_layers"]] \
        == [record["mlp_width"] for record in result.report["layers"]]
    assert os.path.exists(out / "modeling_hf_snp.py")

    # without hf_snp: the code files travel with the checkpoint
    got, class_name = reload_in_fresh_process(tmp_path, out, "trust_remote_code=True", BLOCK_HF_SNP)
    assert class_name.startswith("HfSnp")
    assert torch.allclose(got, expected, atol=1e-5)
    # with hf_snp imported: no trust_remote_code needed
    got, _ = reload_in_fresh_process(tmp_path, out, "", "import hf_snp")
    assert torch.allclose(got, expected, atol=1e-5)


def test_report_and_tokenizer_are_saved(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    word_level = models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(word_level), unk_token="[UNK]")
    result = prune_quiet(TINY["llama"](), tokenizer=tokenizer, sparsity=0.2, output_dir=str(tmp_path / "out"))
    report = json.load(open(tmp_path / "out" / REPORT_NAME))
    assert report == json.loads(json.dumps(result.report))
    for key in ("method", "sparsity", "params_before", "params_after", "layers", "timings_s"):
        assert key in report
    assert AutoTokenizer.from_pretrained(tmp_path / "out").convert_tokens_to_ids("a") == 1


def test_pruning_a_pruned_hf_snp_model_again(tmp_path):
    first = prune_quiet(TINY["llama"](), sparsity=0.25, layer_sparsity={0: 0.0}, output_dir=str(tmp_path / "a"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert torch.allclose(logits(reloaded), logits(first.model), atol=1e-5)
    second = prune_quiet(reloaded, sparsity=0.25, output_dir=str(tmp_path / "b"))
    assert [record["mlp_width_before"] for record in second.report["layers"]] \
        == [record["mlp_width"] for record in first.report["layers"]]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert torch.allclose(logits(again), logits(second.model), atol=1e-5)
