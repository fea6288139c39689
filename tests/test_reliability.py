"""Reliability: dtypes, singular statistics, safe writes, determinism."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import TINY, calibration_ids, logits, make_scaled_copies, prune_quiet, sparsity_removing, tiny_llama

from hf_snp.setup.preflight import RankDeficientCalibrationWarning


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_prune_with_float32_statistics(dtype):
    model = tiny_llama()
    make_scaled_copies(model, 12)
    reference32 = logits(model)
    half = copy.deepcopy(model).to(dtype)
    sparsity = sparsity_removing(model, 12)
    result = prune_quiet(half, method="snp", sparsity=sparsity, targets=("mlp", "heads"), allocation="uniform")
    full = prune_quiet(copy.deepcopy(model), method="snp", sparsity=sparsity, targets=("mlp", "heads"),
                       allocation="uniform")
    assert all(p.dtype == dtype for p in result.model.parameters())
    assert [record["mlp_width"] for record in result.report["layers"]] == [36] * 4
    out = logits(result.model).float()
    assert torch.isfinite(out).all()
    # the half-precision cut is the float32 cut up to half-precision rounding
    assert (out - logits(full.model)).abs().max() < 0.1 * reference32.abs().max()
    for a, b in zip(result.model.parameters(), full.model.parameters()):
        assert a.shape == b.shape


def test_singular_statistics_from_tiny_calibration_stay_finite():
    model = tiny_llama()
    with pytest.warns(RankDeficientCalibrationWarning,
                      match=r"calibration has 6 tokens but the widest site \(mlp, 48 units\)"):
        result = prune_quiet(model, method="snp", sparsity=0.5, targets=("mlp", "heads"),
                             calibration=calibration_ids(2, 3))
    for name, param in result.model.named_parameters():
        assert torch.isfinite(param).all(), name
    assert torch.isfinite(logits(result.model)).all()


def test_duplicated_units_do_not_produce_nan():
    model = tiny_llama()
    with torch.no_grad():  # every MLP neuron identical: the Gram matrix has rank 1
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:] = layer.mlp.gate_proj.weight[:1]
            layer.mlp.up_proj.weight[:] = layer.mlp.up_proj.weight[:1]
    result = prune_quiet(model, method="snp", sparsity=0.9)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


class Interrupted(BaseException):
    pass


def test_an_interrupted_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def save_then_die(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)
        raise Interrupted  # killed after the weights, before tokenizer and report

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_die)
    with pytest.raises(Interrupted):
        prune_quiet(tiny_llama(), sparsity=0.3, output_dir=str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []  # neither the target nor a staging directory


def test_an_interrupted_overwrite_keeps_the_previous_result(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    out = tmp_path / "out"
    prune_quiet(tiny_llama(), sparsity=0.3, output_dir=str(out))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def die(self, *args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", die)
    with pytest.raises(Interrupted):
        prune_quiet(tiny_llama(seed=1), sparsity=0.5, output_dir=str(out), overwrite=True)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", ["snp", "vbp", "random"])
def test_same_inputs_and_seed_give_bit_identical_weights(family, method):
    runs = [prune_quiet(TINY[family](), method=method, sparsity=0.3, targets=("mlp", "heads"), seed=4).model
            for _ in range(2)]
    first, second = (dict(m.state_dict()) for m in runs)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    if method == "random":  # and the seed matters
        other = prune_quiet(TINY[family](), method=method, sparsity=0.3, seed=5).model.state_dict()
        assert any(not torch.equal(first[k], other[k])
                   for k in first if k in other and first[k].shape == other[k].shape)
