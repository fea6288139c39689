"""The hf-snp command line on a tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import TINY
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hf_snp.cli import main


@pytest.fixture
def tiny_dir(tmp_path):
    words = [f"w{i}" for i in range(90)]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
    TINY["llama"]().save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    (tmp_path / "calib.txt").write_text(" ".join(words[i % 90] for i in range(3000)))
    return tmp_path


def test_cli_prune_then_eval(tiny_dir, capsys):
    out = tiny_dir / "pruned"
    code = main(["prune", str(tiny_dir / "dense"), "--method", "vbp", "--sparsity", "0.25", "--targets", "mlp",
                 "--calibration", str(tiny_dir / "calib.txt"), "--num-samples", "8", "--seq-len", "32",
                 "--out", str(out), "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "vbp" and summary["params_after"] < summary["params_before"]
    report = json.load(open(out / "hf_snp_report.json"))
    assert report["num_samples"] == 8 and report["seq_len"] == 32
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == summary["params_after"]

    code = main(["eval", str(out), "--ppl", str(tiny_dir / "calib.txt"), "--seq-len", "32", "--max-windows", "4",
                 "--quiet"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


def test_cli_reports_bad_input_without_a_traceback(tiny_dir, capsys):
    code = main(["prune", str(tiny_dir / "dense"), "--sparsity", "1.5", "--out", str(tiny_dir / "x")])
    assert code == 2
    assert "sparsity must be a fraction in [0, 1)" in capsys.readouterr().err
    assert not (tiny_dir / "x").exists()


def test_cli_prunes_heads_in_kv_group_mode(tiny_dir, capsys):
    out = tiny_dir / "heads"
    code = main(["prune", str(tiny_dir / "dense"), "--targets", "mlp,heads", "--gqa-mode", "kv_groups",
                 "--sparsity", "0.5", "--allocation", "uniform", "--calibration", str(tiny_dir / "calib.txt"),
                 "--num-samples", "4", "--seq-len", "32", "--out", str(out), "--quiet"])
    assert code == 0
    report = json.load(open(out / "hf_snp_report.json"))
    assert report["targets"] == ["mlp", "heads"] and report["gqa_mode"] == "kv_groups"
    assert {(record["num_heads"], record["num_kv_heads"]) for record in report["layers"]} == {(2, 1)}
    config = json.load(open(out / "config.json"))
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
