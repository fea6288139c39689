"""Model-aware SNP (issue 15, docs/design.md §3.7): dense-target reconstruction (``reconstruction_target``) and the
order of the cuts within a block (``within_block``)."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from conftest import calibration_ids, prune_quiet, sites_of, tiny_llama, tiny_opt
from safetensors.torch import load_file

import hf_snp
from hf_snp.passes.dense_target import DenseStream
from hf_snp.units.linalg import dense_target_map, least_squares_map
from hf_snp.units.sites import MlpSite
from hf_snp.units.stats import SiteStatistics

FAMILIES = {"llama": tiny_llama, "opt": tiny_opt}


def padded_calibration() -> dict:
    """Calibration windows whose last tokens are padding (a different count per window)."""
    ids = calibration_ids()
    mask = torch.ones_like(ids)
    for row in range(ids.shape[0]):
        mask[row, ids.shape[1] - row % 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def consumer_io(model, kind: str, layer: int, calibration) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The units entering a site's consumer and its outputs, on the calibration's non-padding tokens (float64)."""
    consumer = sites_of(model, kind)[layer].consumer_linear
    seen = {}
    handle = consumer.register_forward_hook(lambda module, args, out: seen.update(units=args[0], out=out))
    try:
        if isinstance(calibration, dict):
            model(**calibration)
        else:
            model(calibration)
    finally:
        handle.remove()
    keep = (calibration["attention_mask"] if isinstance(calibration, dict) else torch.ones_like(calibration)).bool()
    units, out = (seen[key].reshape(keep.numel(), -1)[keep.flatten()].double() for key in ("units", "out"))
    return units, out, consumer


def weights_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b) -> None:
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# --- dense-target reconstruction: the maths ---------------------------------------------------------------------

@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_dense_target_map_with_equal_streams_is_the_least_squares_map(damping):
    """C = M (dense and pruned units equal): mix is I on the kept rows and §3.6's B on the removed ones."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(200, 9, generator=gen, dtype=torch.float64) @ torch.randn(9, 9, generator=gen, dtype=torch.float64)
    moment = h.T @ h / 200
    keep, drop = torch.tensor([0, 2, 3, 5, 8]), torch.tensor([1, 4, 6, 7])
    mix = dense_target_map(moment, moment, keep, damping)
    torch.testing.assert_close(mix[keep], torch.eye(len(keep), dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(mix[drop], least_squares_map(moment, keep, drop, damping), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family, targets, within_block, calibration", [
    ("llama", ("mlp",), "joint", "plain"),
    ("opt", ("mlp",), "joint", "padded"),
    ("llama", ("heads",), "joint", "padded"),
    ("llama", ("mlp", "heads"), "sequential", "plain"),
    ("opt", ("mlp", "heads"), "sequential", "padded"),
])
def test_dense_target_is_the_least_squares_fit_of_the_dense_consumer_output(family, targets, within_block,
                                                                               calibration):
    """Every layer's consumer equals the least-squares fit (lstsq, with an intercept where there is a bias) of the
    dense model's consumer output on the pruned model's kept units over the calibration's non-padding tokens. Wrong
    pairing, masking or a stream one block off would each give another fit."""
    dense = FAMILIES[family]()
    calib = padded_calibration() if calibration == "padded" else calibration_ids()
    result = prune_quiet(copy.deepcopy(dense), calibration=calib, targets=targets, sparsity=0.3,
                         reconstruction_target="dense", within_block=within_block)
    for kind in targets:
        for layer in range(4):
            _, target, _ = consumer_io(dense, kind, layer, calib)
            kept, _, consumer = consumer_io(result.model, kind, layer, calib)
            assert kept.shape[1] < sites_of(dense, kind)[layer].num_units  # the layer was pruned
            design = kept if consumer.bias is None else torch.cat([kept, torch.ones(len(kept), 1).double()], 1)
            fit = torch.linalg.lstsq(design, target).solution.T
            got = consumer.weight.double() if consumer.bias is None else torch.cat(
                [consumer.weight.double(), consumer.bias.double()[:, None]], 1)
            torch.testing.assert_close(got, fit, rtol=1e-2, atol=1e-3, msg=f"{kind} of layer {layer}")


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_target_brings_a_later_consumer_closer_to_the_dense_model(family):
    """Layer 0 is cut (identically in both runs: the streams are equal there), layer 2 after it: both runs see the
    same pruned units at layer 2 and keep the same ones, and the dense target's map, the least-squares optimum, has
    the smaller error against the dense model's consumer output."""
    dense = FAMILIES[family]()
    calib = calibration_ids()
    options = dict(targets=("mlp",), sparsity=0.0, layer_sparsity={0: 0.5, 2: 0.4})
    errors = {}
    for target in ("pruned", "dense"):
        model = prune_quiet(copy.deepcopy(dense), reconstruction_target=target, **options).model
        kept, out, _ = consumer_io(model, "mlp", 2, calib)
        errors[target] = float((out - consumer_io(dense, "mlp", 2, calib)[1]).pow(2).mean())
        assert kept.shape[1] < 48
    assert errors["dense"] < 0.99 * errors["pruned"], errors


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_target_equals_todays_map_while_nothing_upstream_is_cut(family):
    dense = FAMILIES[family]()
    options = dict(targets=("mlp", "heads"), sparsity=0.0, ridge="fixed", layer_sparsity={3: 0.4})
    pruned = prune_quiet(copy.deepcopy(dense), reconstruction_target="pruned", **options).model
    assert_same_weights(prune_quiet(copy.deepcopy(dense), reconstruction_target="dense", **options).model, pruned)


@pytest.mark.parametrize("family", FAMILIES)
def test_paired_statistics_of_equal_streams_give_todays_map(family, monkeypatch):
    """Pairing the dense and pruned units even while the streams are equal (token masks included) reproduces §3.6's
    map up to float32 accumulation: the dense-target maths reduces to it."""
    dense = FAMILIES[family]()
    options = dict(targets=("mlp", "heads"), sparsity=0.0, ridge="fixed", layer_sparsity={0: 0.4, 3: 0.4},
                   calibration=padded_calibration())
    pruned = weights_of(prune_quiet(copy.deepcopy(dense), **options).model)
    monkeypatch.setattr(DenseStream, "always_pair", True)
    paired = weights_of(prune_quiet(copy.deepcopy(dense), reconstruction_target="dense", **options).model)
    assert paired.keys() == pruned.keys()
    for key in pruned:
        if ".0." in key:  # layer 0: both streams are the captured inputs
            torch.testing.assert_close(paired[key], pruned[key], rtol=1e-4, atol=1e-5, msg=key)


def test_dense_target_records_its_extra_cost():
    timings = prune_quiet(tiny_llama(), targets=("mlp", "heads"), reconstruction_target="dense").report["timings_s"]
    assert timings["dense_stream"] > 0 and timings["cross_moments"] > 0


@pytest.mark.parametrize("options, message", [
    (dict(method="vbp"), "method 'vbp' does not reconstruct"),
    (dict(reconstruct=False), "reconstruct=False"),
    (dict(targets=("experts",)), "cannot serve target 'experts'"),
    (dict(reconstruction_target="teacher"), "unknown reconstruction_target"),
    (dict(within_block="mlp_first"), "unknown within_block"),
])
def test_bad_combinations_are_refused_before_any_work(no_long_work, options, message):
    with pytest.raises(ValueError, match=message):
        prune_quiet(tiny_llama(), **{"reconstruction_target": "dense", **options})


def test_dense_target_refuses_routed_experts_but_not_their_heads(no_long_work):
    from test_moe import tiny_moe

    with pytest.raises(ValueError, match="cannot reconstruct routed experts"):
        prune_quiet(tiny_moe("mixtral"), targets=("mlp",), reconstruction_target="dense")
    with pytest.raises(AssertionError, match="long work started"):  # accepted: it gets as far as the engine
        prune_quiet(tiny_moe("mixtral"), targets=("heads",), sparsity=0.5, reconstruction_target="dense")


@pytest.mark.parametrize("kill_after", [0, 1])
def test_a_dense_target_run_resumes_to_identical_weights(tmp_path, kill_after):
    """Block 0 is left alone and block 1 is the first cut: resuming after either rebuilds the dense stream."""
    from test_resume import prune_killed_after_block

    tiny_llama().save_pretrained(tmp_path / "dense")
    common = dict(calibration=calibration_ids(), progress=False, device="cpu", batch_size=4, sparsity=0.3,
                  targets=["mlp", "heads"], layer_sparsity={0: 0.0}, reconstruction_target="dense",
                  within_block="sequential")
    expected = hf_snp.prune(str(tmp_path / "dense"), **common).model.state_dict()
    status = prune_killed_after_block(kill_after, str(tmp_path / "dense"), checkpoint_dir=str(tmp_path / "ckpt"),
                                      **common)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    hf_snp.prune(str(tmp_path / "dense"), checkpoint_dir=str(tmp_path / "ckpt"), resume=True,
                 output_dir=str(tmp_path / "resumed"), **common)
    got = load_file(tmp_path / "resumed" / "model.safetensors")
    for key, value in got.items():
        assert torch.equal(expected[key], value), key


# --- the order within a block -----------------------------------------------------------------------------------

def mlp_statistics_inputs(monkeypatch, **options) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], object]:
    """Prune tiny Llama, recording per layer the units the MLP statistics saw (all batches) and the units kept."""
    seen: dict[int, list[torch.Tensor]] = {}
    kept: dict[int, torch.Tensor] = {}
    update, apply = SiteStatistics.update, MlpSite.apply

    def record_update(self, h):
        if self.name.endswith("mlp (Linear input)"):
            seen.setdefault(int(self.name.split()[1]), []).append(h.detach().clone())
        update(self, h)

    def record_apply(self, decision):
        kept[self.index] = decision.keep.clone()
        apply(self, decision)

    monkeypatch.setattr(SiteStatistics, "update", record_update)
    monkeypatch.setattr(MlpSite, "apply", record_apply)
    result = prune_quiet(tiny_llama(), sparsity=0.3, **options)
    return {layer: torch.cat(batches) for layer, batches in seen.items()}, kept, result.model


@pytest.mark.parametrize("within_block", ["joint", "sequential"])
def test_sequential_mlp_statistics_see_the_cut_attention(monkeypatch, within_block):
    """The units the MLP statistics saw, restricted to the kept ones, are what the cut block's down_proj receives
    exactly when the statistics were taken after the head cuts."""
    seen, kept, model = mlp_statistics_inputs(monkeypatch, targets=("mlp", "heads"), within_block=within_block)
    calib = calibration_ids()
    matches = []
    for layer in range(4):
        units, _, _ = consumer_io(model, "mlp", layer, calib)
        statistics = seen[layer][..., kept[layer]].reshape(-1, len(kept[layer])).double()
        matches.append(torch.allclose(statistics, units, rtol=1e-4, atol=1e-5))
    assert all(matches) if within_block == "sequential" else not any(matches)


def test_sequential_changes_nothing_without_head_cuts():
    dense = tiny_llama()
    joint = prune_quiet(copy.deepcopy(dense), targets=("mlp",), sparsity=0.3).model
    assert_same_weights(prune_quiet(copy.deepcopy(dense), targets=("mlp",), sparsity=0.3,
                                    within_block="sequential").model, joint)
