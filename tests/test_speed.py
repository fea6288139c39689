"""The speed probe: what it measures, speed-ups against a baseline, and where it shows up (report, card, CLI)."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import TINY, prune_quiet

from hf_snp.deliver.card import model_card
from hf_snp.deliver.report import PruneReport
from hf_snp.deliver.speed import SpeedProbe, compare_speed, measure_once

PROBE = SpeedProbe(batch_sizes=(1, 4), prompt_len=16, new_tokens=6, repeats=1)


def kv_bytes_per_token(model) -> int:
    """2 (keys, values) x layers x KV heads x head_dim x 4 bytes, from the modules' shapes."""
    return sum(2 * layer.self_attn.k_proj.out_features * 4 for layer in model.model.layers)


def test_one_measurement_has_every_probe_and_the_cache_size_of_the_shapes():
    model = TINY["llama"]()
    result = measure_once(model, PROBE)
    for key in ("prefill_b1_tokens_per_s", "prefill_b4_tokens_per_s", "ttft_s", "decode_tokens_per_s"):
        assert result[key] > 0, key
    assert result["kv_cache_bytes_per_token"] == kv_bytes_per_token(model)
    assert result["weight_bytes"] == sum(p.numel() * 4 for p in model.parameters())


def test_speedups_are_against_the_first_model_or_the_baseline():
    dense = TINY["llama"]()
    pruned = prune_quiet(copy.deepcopy(dense), sparsity=0.5, targets=("mlp", "heads"), gqa_mode="kv_groups").model
    measured = compare_speed({"dense": dense, "pruned": pruned}, PROBE)
    first, second = measured["models"]["dense"], measured["models"]["pruned"]
    assert first["prefill_speedup"] == {"b1": 1.0, "b4": 1.0} and first["decode_speedup"] == 1.0
    assert second["prefill_speedup"]["b4"] == pytest.approx(
        second["prefill_b4_tokens_per_s"] / first["prefill_b4_tokens_per_s"])
    assert second["ttft_speedup"] == pytest.approx(first["ttft_s"] / second["ttft_s"])
    assert second["kv_cache_bytes_per_token"] == first["kv_cache_bytes_per_token"] / 2  # one KV group of two left
    against = compare_speed({"pruned": pruned}, PROBE, baseline=first)["models"]["pruned"]
    assert against["decode_speedup"] == pytest.approx(against["decode_tokens_per_s"] / first["decode_tokens_per_s"])


def test_prune_measure_speed_fills_the_report_and_the_card(tmp_path):
    result = prune_quiet(TINY["llama"](), sparsity=0.5, measure_speed=True, output_dir=str(tmp_path / "out"))
    speed = result.report["speed"]
    assert speed["device"].startswith("cpu") and speed["prefill_speedup"]["b8"] > 0 and speed["decode_speedup"] > 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| speed-up | prefill " in card and "(batch 8)" in card and "on cpu" in card
    assert "speed-up" not in model_card(PruneReport({**result.report, "speed": None}))


def test_cli_eval_speed_against_a_baseline_and_saved(tmp_path, capsys):
    from hf_snp.cli import main

    dense = TINY["opt"]()
    dense.save_pretrained(tmp_path / "dense")
    prune_quiet(copy.deepcopy(dense), sparsity=0.5, output_dir=str(tmp_path / "pruned"))
    assert main(["eval", str(tmp_path / "pruned"), "--speed", "--baseline", str(tmp_path / "dense"), "--save",
                 "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)["speed"]
    assert printed["baseline"] == str(tmp_path / "dense") and printed["prefill_speedup"]["b1"] > 0
    saved = json.loads((tmp_path / "pruned" / "hf_snp_report.json").read_text())
    assert saved["speed"]["decode_speedup"] == printed["decode_speedup"]
    assert main(["eval", str(tmp_path / "pruned"), "--baseline", str(tmp_path / "dense")]) == 2  # needs --speed
