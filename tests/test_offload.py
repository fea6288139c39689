"""Accelerate placement: a model with blocks offloaded to disk prunes to the same weights."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, calibration_ids, logits
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_snp


def device_map_for(family: str, on_disk: set[int]) -> dict[str, str]:
    if family == "llama":
        top = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        prefix = "model.layers"
    else:
        top = {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",
               "model.decoder.final_layer_norm": "cpu", "lm_head": "cpu"}
        prefix = "model.decoder.layers"
    return {**top, **{f"{prefix}.{i}": "disk" if i in on_disk else "cpu" for i in range(4)}}


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", ["snp", "vbp"])
def test_disk_offloaded_run_matches_in_memory_run(tmp_path, family, method):
    TINY[family]().save_pretrained(tmp_path / "dense")
    options = dict(method=method, sparsity=0.3, calibration=calibration_ids(), batch_size=4, progress=False,
                   device="cpu")

    in_memory = hf_snp.prune(str(tmp_path / "dense"), output_dir=str(tmp_path / "mem"), **options)
    offloaded_model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", device_map=device_map_for(family, {1, 3}), offload_folder=str(tmp_path / "offload")
    )
    layers = hf_snp.get_adapter(offloaded_model.config).layers(offloaded_model)
    assert layers[1].get_submodule(in_memory.model.config.model_type == "opt" and "fc2" or "mlp.down_proj") \
        .weight.device.type == "meta"
    offloaded = hf_snp.prune(offloaded_model, output_dir=str(tmp_path / "disk"), **options)

    # the offloaded blocks stay offloaded (their weights left memory again) ...
    consumer = "fc2" if family == "opt" else "mlp.down_proj"
    assert layers[3].get_submodule(consumer).weight.device.type == "meta"
    # ... and the saved weights are those of the in-memory run
    expected = load_file(tmp_path / "mem" / "model.safetensors")
    got = load_file(tmp_path / "disk" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert expected[key].shape == got[key].shape, key
        assert torch.allclose(expected[key], got[key], atol=1e-6), key
    assert offloaded.report["params_after"] == in_memory.report["params_after"]
    # the offloaded model still runs forward through accelerate's hooks
    assert torch.allclose(logits(offloaded.model), logits(in_memory.model), atol=1e-5)


def test_offloaded_models_are_detected_for_the_allocator_setting(tmp_path, monkeypatch):
    from hf_snp.passes.placement import has_offloaded_weights, keep_freed_blocks_out_of_memory

    TINY["llama"]().save_pretrained(tmp_path / "dense")
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map_for("llama", {1}),
                                                     offload_folder=str(tmp_path / "offload"))
    assert has_offloaded_weights(offloaded) and not has_offloaded_weights(TINY["llama"]())
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the user's own setting wins
    assert keep_freed_blocks_out_of_memory() is False
