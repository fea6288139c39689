"""prune(calibration="self", evaluate=...) and hf-snp eval --against: the dense reference made before the cut,
saved and reused, the metrics in the report, the model's own calibration written after the weights load."""

from __future__ import annotations

import json

import pytest
import torch
from chat_helpers import chat_tokenizer
from conftest import tiny_llama

import hf_snp
from hf_snp.cli import main
from hf_snp.evaluation.reference import DenseReference

OPTIONS = dict(sparsity=0.4, targets=("mlp",), num_samples=4, seq_len=24, progress=False)


def prune(tmp_path, name, **options):
    return hf_snp.prune(tiny_llama(), chat_tokenizer(), output_dir=str(tmp_path / name), **{**OPTIONS, **options})


def test_evaluate_dense_reports_the_comparison_and_saves_the_reference(tmp_path):
    result = prune(tmp_path, "out", calibration="self", evaluate="dense")
    metrics = result.report["metrics"]
    for key in ("kl_text", "agreement_text", "kl_chat", "agreement_chat", "empty_reply_share"):
        assert key in metrics
    # the word-level test tokenizer reads English as one unknown token: the replies carry the signal
    assert metrics["kl_chat"] > 1e-6 and 0 <= metrics["agreement_chat"] <= 1 and len(metrics["replies"]) == 3
    assert result.report["timings_s"]["calibration_generation"] > 0
    assert result.report["calibration"].startswith("self")
    saved = tmp_path / "out" / "dense_reference"
    again = hf_snp.evaluate(result.model, str(saved), chat_tokenizer())
    assert again["kl_chat"] == pytest.approx(metrics["kl_chat"], rel=1e-6)
    assert json.load(open(tmp_path / "out" / "hf_snp_report.json"))["metrics"]["kl_chat"] == metrics["kl_chat"]


def test_a_reference_folder_is_computed_once_and_reused(tmp_path, monkeypatch):
    folder = str(tmp_path / "reference")
    prune(tmp_path, "first", calibration="wikitext2-local", evaluate=folder)
    assert DenseReference.load(folder).meta["k"] > 0

    def refuse(*args, **kwargs):
        raise AssertionError("the saved reference must be reused")

    monkeypatch.setattr(DenseReference, "compute", refuse)
    second = prune(tmp_path, "second", calibration="wikitext2-local", evaluate=folder, sparsity=0.2)
    reused = second.report["metrics"]["kl_chat"]
    assert reused > 1e-6 and reused == pytest.approx(hf_snp.evaluate(second.model, folder, chat_tokenizer())["kl_chat"])


def test_self_calibration_through_prune_is_reproducible_and_seeded(tmp_path):
    weights = [prune(tmp_path, f"run{i}", calibration="self", seed=seed).model.state_dict()
               for i, seed in enumerate((0, 0, 1))]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0] if weights[0][k].shape ==
               weights[2][k].shape)


def test_cli_eval_against_the_dense_model_and_its_saved_reference(tmp_path, capsys):
    dense = tmp_path / "dense"
    tiny_llama().save_pretrained(dense)
    chat_tokenizer().save_pretrained(dense)
    prune(tmp_path, "pruned", calibration="wikitext2-local")
    pruned = str(tmp_path / "pruned")
    assert main(["eval", pruned, "--against", str(dense), "--save-reference", str(tmp_path / "ref"), "--quiet"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["eval", pruned, "--against", str(tmp_path / "ref"), "--quiet", "--save"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["kl_chat"] > 1e-6 and second["kl_chat"] == pytest.approx(first["kl_chat"], rel=1e-6)
    assert json.load(open(tmp_path / "pruned" / "hf_snp_report.json"))["metrics"]["kl_chat"] == second["kl_chat"]
