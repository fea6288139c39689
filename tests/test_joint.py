"""The iterative block/unit search (block_search='iterative', docs/design.md §7.3): equal-size candidates, CKA of the
final-norm states on held-out windows, exact choices on planted structure, no whole-model copy, reuse of the scan."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY, TINY_VISION, calibration_ids, logits, make_scaled_copies, pixel_values, prune_quiet, sites_of
from test_blocks import decoder_layers, make_identity_block, one_block_sparsity
from test_save_reload import BLOCK_HF_SNP, reload_in_fresh_process
from torch import nn
from transformers import LlamaForCausalLM

import hf_snp
from hf_snp.config import PruneConfig
from hf_snp.passes.blocks import linear_cka, token_sample
from hf_snp.passes.iterative import IterativeSearch, round_to_total, split_calibration
from hf_snp.units.allocation import WidthRules
from hf_snp.units.sites import count_parameters


def iterative(model, **kwargs):
    return prune_quiet(model, block_search="iterative", **kwargs)


def layer_params(model) -> int:
    return sum(count_parameters(layer) for layer in decoder_layers(model))


@torch.no_grad()
def heldout_final_states(model) -> torch.Tensor:
    """The final-norm states of the held-out calibration windows, computed by the model's own forward."""
    held = calibration_ids()[[i for i in range(16) if i % 4 == 3]]
    return token_sample([(model(held, output_hidden_states=True).hidden_states[-1], None)])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_an_identity_block_is_removed_by_the_first_round(family):
    model = TINY[family]()
    make_identity_block(model, 1)
    reference = logits(model)
    result = iterative(copy.deepcopy(model), targets=("mlp", "heads", "blocks"), sparsity=one_block_sparsity(model))
    rounds = result.report["blocks"]["rounds"]
    assert rounds[0]["kept"] == "block" and rounds[0]["block"]["layer"] == 1
    assert rounds[0]["block"]["cka"] == pytest.approx(1.0, abs=1e-9) and rounds[0]["units"]["cka"] < 1.0
    assert len(rounds) == 1 and result.report["blocks"]["removed"] == [1]
    assert (logits(result.model) - reference).abs().max() < 1e-5


def test_units_are_kept_when_the_redundancy_is_in_the_units():
    model = TINY["llama"]()
    make_scaled_copies(model, 12)  # every layer: 12 MLP neurons are copies of others
    reference = logits(model)
    step = sites_of(model, "mlp")[0].params_per_step()
    result = iterative(copy.deepcopy(model), targets=("mlp", "blocks"), sparsity=4 * 10 * step / layer_params(model))
    rounds = result.report["blocks"]["rounds"]
    assert all(r["kept"] == "units" and r["units"]["cka"] == pytest.approx(1.0, abs=1e-6) for r in rounds)
    assert result.report["blocks"]["removed"] == [] and result.model.config.num_hidden_layers == 4
    assert (logits(result.model) - reference).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_candidates_are_equal_size_and_the_budget_is_met(family):
    model = TINY[family]()
    dense_params = layer_params(model)
    result = iterative(copy.deepcopy(model), targets=("mlp", "blocks"), sparsity=0.45)
    step = sites_of(model, "mlp")[0].params_per_step()
    rounds = result.report["blocks"]["rounds"]
    assert len(rounds) >= 2
    for entry in rounds:
        if entry["block"] is not None:  # the unit cut is the block's size, up to half a neuron per layer
            assert abs(entry["units"]["params"] - entry["block"]["params"]) <= 4 * step / 2 + 1
    removed = dense_params - layer_params(result.model)
    budget = result.report["blocks"]["budget_params"]
    assert budget - 4 * step <= removed <= budget + 4 * step / 2
    assert result.report["params_removed"] == removed


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_kept_cka_is_the_pruned_models_own(family):
    """The last round's kept CKA, computed on trial copies and decisions, equals the CKA of the pruned model's own
    forward on the held-out windows: the decisions replayed on the model give the trial's network."""
    model = TINY[family]()
    reference = heldout_final_states(model)
    result = iterative(copy.deepcopy(model), targets=("mlp", "heads", "blocks"), sparsity=0.4)
    last = result.report["blocks"]["rounds"][-1]
    kept = last[last["kept"]]["cka"]
    assert kept == pytest.approx(linear_cka(reference, heldout_final_states(result.model)), abs=1e-6)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("targets", [("mlp", "blocks"), ("mlp", "experts", "heads", "blocks")])
def test_mixtures_of_experts_keep_their_own_cka(family, targets):
    """A layer's stacked experts are cut together (tied steps), also when whole experts go in the same round."""
    from test_moe import tiny_moe

    model = tiny_moe(family, layers=3)
    reference = heldout_final_states(model)
    result = iterative(model, targets=targets, sparsity=0.4)
    rounds = result.report["blocks"]["rounds"]
    kept = rounds[-1][rounds[-1]["kept"]]["cka"]
    assert any(r["kept"] == "units" for r in rounds)
    assert kept == pytest.approx(linear_cka(reference, heldout_final_states(result.model)), abs=1e-6)


def test_zero_sparsity_changes_nothing():
    model = TINY["llama"]()
    result = iterative(copy.deepcopy(model), targets=("mlp", "heads", "blocks"), sparsity=0.0)
    assert result.report["blocks"]["rounds"] == [] and result.report["params_removed"] == 0
    assert torch.equal(logits(result.model), logits(model))


def test_the_scan_after_a_block_round_equals_a_full_scan(monkeypatch):
    """After a block round only the blocks from the removed one on are streamed again; the cosines and snapshots
    equal those of a scan from block 0."""
    original, checked = IterativeSearch._scan, []

    def scan_and_check(self, eligible, reuse):
        found = original(self, eligible, reuse)
        if reuse is not None:
            full = original(self, eligible, None)
            assert found.cosines == pytest.approx(full.cosines, abs=1e-6)
            assert set(found.snapshots) == set(full.snapshots)
            for index, hidden in full.snapshots.items():
                assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(found.snapshots[index], hidden))
            checked.append(len(reuse.cosines))
        return found

    monkeypatch.setattr(IterativeSearch, "_scan", scan_and_check)
    config = TINY["llama"]().config
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    for index in (2, 4):
        make_identity_block(model, index)
    iterative(model, targets=("mlp", "blocks"), sparsity=2.5 / 6)
    assert checked  # a block round was followed by a reused scan


def test_no_copy_of_the_whole_model(monkeypatch):
    """Candidates are built one block at a time: nothing deep-copied holds more than one decoder layer."""
    copied, original = [], copy.deepcopy

    def recording(value, memo=None):
        if isinstance(value, nn.Module):
            copied.append(count_parameters(value))
        return original(value, memo)

    model = TINY["llama"]()
    largest = max(count_parameters(layer) for layer in decoder_layers(model))
    monkeypatch.setattr(copy, "deepcopy", recording)
    iterative(model, targets=("mlp", "heads", "blocks"), sparsity=0.4)
    assert copied and max(copied) <= largest


def test_global_allocation_runs_each_round_on_the_current_model():
    model = TINY["llama"]()
    result = iterative(copy.deepcopy(model), targets=("mlp", "heads", "blocks"), sparsity=0.4, allocation="global")
    removed = layer_params(model) - layer_params(result.model)
    assert result.report["blocks"]["rounds"] and removed == pytest.approx(0.4 * layer_params(model), rel=0.15)


def test_the_result_saves_and_reloads_in_a_fresh_process(tmp_path):
    result = iterative(TINY["llama"](), targets=("mlp", "heads", "blocks"), sparsity=0.4,
                       output_dir=str(tmp_path / "out"))
    got, _ = reload_in_fresh_process(tmp_path, tmp_path / "out", "trust_remote_code=True", BLOCK_HF_SNP)
    assert torch.allclose(got, logits(result.model), atol=1e-5)
    assert result.report.plot(str(tmp_path / "report.png"))


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_vision_models_prune_blocks_and_units(family):
    model = TINY_VISION[family]()
    result = hf_snp.prune(model, calibration=pixel_values(12), batch_size=4, progress=False, block_search="iterative",
                          targets=("mlp", "heads", "blocks"), sparsity=0.4)
    rounds = result.report["blocks"]["rounds"]
    assert rounds and {r["kept"] for r in rounds} <= {"block", "units"}
    assert result.model(pixel_values=pixel_values(2, seed=5)).logits.isfinite().all()


def test_held_out_windows_are_every_fourth():
    calib = hf_snp.setup.calibration.load_calibration(calibration_ids(), None, 16, 24)
    fit, held = split_calibration(calib)
    assert torch.equal(held.input_ids, calibration_ids()[[3, 7, 11, 15]]) and fit.num_samples == 12


@pytest.mark.parametrize("options, message", [
    ({"targets": ("mlp", "blocks"), "reconstruction_target": "dense"}, "reconstruction_target='dense'"),
    ({"targets": ("mlp", "blocks"), "num_samples": 1}, "num_samples must be at least 2"),
])
def test_bad_input_is_refused_before_any_work(options, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(block_search="iterative", **options).validate()


def test_a_single_calibration_window_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        iterative(TINY["llama"](), targets=("mlp", "blocks"), calibration=calibration_ids(1))


class StepSite:
    """A site whose every step removes ``per_step`` parameters (for the rounding check)."""

    kind, width_multiple, tied, index = "heads", 1, False, 0

    def __init__(self, num_units: int, per_step: int):
        self.num_units, self.per_step = num_units, per_step

    def max_steps(self) -> int:
        return self.num_units - 1

    def width_after(self, steps: int) -> int:
        return self.num_units - steps

    def params_removed(self, steps: int) -> int:
        return steps * self.per_step

    def step_table(self) -> tuple[list[int], list[int]]:
        steps = range(self.max_steps() + 1)
        return [self.width_after(s) for s in steps], [self.params_removed(s) for s in steps]


@pytest.mark.parametrize("seed", range(20))
def test_rounding_to_a_total_stays_within_half_the_largest_step(seed):
    """Each site takes the allowed count just below or just above its target, and the sum lands within half the
    largest such step of the total (so a round of units is the block's size, up to half a step)."""
    generator = torch.Generator().manual_seed(seed)
    sites = {(i, "heads"): StepSite(int(torch.randint(3, 12, (1,), generator=generator)),
                                    int(torch.randint(1, 50, (1,), generator=generator))) for i in range(6)}
    targets = {key: float(torch.rand(1, generator=generator)) * site.params_removed(site.max_steps())
               for key, site in sites.items()}
    total = sum(targets.values())
    steps = round_to_total(sites, targets, total, WidthRules())
    for key, site in sites.items():
        assert site.params_removed(steps[key]) - site.per_step < targets[key] < site.params_removed(steps[key]) \
            + site.per_step or targets[key] == site.params_removed(steps[key])
    removed = sum(site.params_removed(steps[key]) for key, site in sites.items())
    assert abs(removed - total) <= max(site.per_step for site in sites.values()) / 2 + 1e-9


def test_unit_rounds_with_heads_match_the_block_size():
    """Heads come in coarse steps; the unit candidate still removes one block's worth, give or take half a step."""
    model = TINY["llama"]()
    result = iterative(copy.deepcopy(model), targets=("mlp", "heads", "blocks"), sparsity=0.5)
    largest = max(site.params_per_step() for kind in ("mlp", "heads") for site in sites_of(model, kind))
    for entry in result.report["blocks"]["rounds"]:
        if entry["block"] is not None:
            assert abs(entry["units"]["params"] - entry["block"]["params"]) <= largest / 2


def test_a_disk_offloaded_model_gives_the_in_memory_result(tmp_path):
    from safetensors.torch import load_file
    from test_offload import device_map_for
    from transformers import AutoModelForCausalLM

    TINY["llama"]().save_pretrained(tmp_path / "dense")
    options = dict(targets=("mlp", "heads", "blocks"), block_search="iterative", sparsity=0.4,
                   calibration=calibration_ids(), batch_size=4, progress=False, device="cpu")
    in_memory = hf_snp.prune(str(tmp_path / "dense"), output_dir=str(tmp_path / "mem"), **options)
    offloaded_model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", device_map=device_map_for("llama", {1, 3}), offload_folder=str(tmp_path / "offload"))
    offloaded = hf_snp.prune(offloaded_model, output_dir=str(tmp_path / "disk"), **options)
    assert offloaded.report["blocks"]["rounds"] == [
        {**r, "seconds": o["seconds"]} for r, o in zip(in_memory.report["blocks"]["rounds"],
                                                       offloaded.report["blocks"]["rounds"])]
    kept = [r["kept"] for r in offloaded.report["blocks"]["rounds"]]
    assert "block" in kept and "units" in kept  # both kinds of round ran on the offloaded model
    expected = load_file(tmp_path / "mem" / "model.safetensors")
    got = load_file(tmp_path / "disk" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[key], got[key], atol=1e-6) for key in expected)
