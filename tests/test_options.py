"""Every option is declared once, in PruneConfig: prune() keywords, the CLI's flags, recipe keys and the report
follow."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import fields

import pytest
import torch

import hf_snp
import hf_snp.api
from hf_snp.cli import build_parser, main
from hf_snp.config import PruneConfig, field_default
from hf_snp.setup.recipes import load_recipe, recipe_fields

# a command-line spelling of a non-default value for each field, and the value prune() must receive
EXAMPLES = {
    "method": (["--method", "vbp"], "vbp"),
    "sparsity": (["--sparsity", "0.25"], 0.25),
    "targets": (["--targets", "mlp,heads"], ("mlp", "heads")),
    "allocation": (["--allocation", "output_error"], "output_error"),
    "allocation_band": (["--allocation-band", "0.2"], 0.2),
    "allocation_samples": (["--allocation-samples", "8"], 8),
    "block_search": (["--block-search", "iterative"], "iterative"),
    "sparsity_per_target": (["--sparsity-per-target", "mlp=0.3,heads=0.1"], {"mlp": 0.3, "heads": 0.1}),
    "layer_sparsity": (["--layer-sparsity", "{0: 0.1, 2: 0.5}"], {0: 0.1, 2: 0.5}),
    "round_to": (["--round-to", "mlp=64,heads=2"], {"mlp": 64, "heads": 2}),
    "min_width": (["--min-width", "7"], 7),
    "gqa_mode": (["--gqa-mode", "kv_groups"], "kv_groups"),
    "damping": (["--damping", "0.01"], 0.01),
    "add_bias": (["--no-add-bias"], False),
    "ordering": (["--ordering", "obs"], "obs"),
    "reconstruct": (["--no-reconstruct"], False),
    "post_norm_weights": (["--no-post-norm-weights"], False),
    "reconstruction_target": (["--reconstruction-target", "dense"], "dense"),
    "within_block": (["--within-block", "sequential"], "sequential"),
    "ridge": (["--ridge", "heldout"], "heldout"),
    "ridge_folds": (["--ridge-folds", "3"], 3),
    "swaps": (["--swaps", "4"], 4),
    "calibration": (["--calibration", "c4"], "c4"),
    "num_samples": (["--num-samples", "16"], 16),
    "seq_len": (["--seq-len", "64"], 64),
    "seed": (["--seed", "3"], 3),
    "batch_size": (["--batch-size", "2"], 2),
    "gguf_file": (["--gguf-file", "m.gguf"], "m.gguf"),
    "dtype": (["--dtype", "bfloat16"], "bfloat16"),
    "device_map": (["--device-map", "auto"], "auto"),
    "max_memory": (["--max-memory", "{0: 8GiB, cpu: 64GiB}"], {0: "8GiB", "cpu": "64GiB"}),
    "offload_folder": (["--offload-folder", "off"], "off"),
    "trust_remote_code": (["--trust-remote-code"], True),
    "device": (["--device", "cpu"], "cpu"),
    "activation_device": (["--activation-device", "cpu"], "cpu"),
    "checkpoint_dir": (["--checkpoint-dir", "ck"], "ck"),
    "resume": (["--resume"], True),
    "progress": (["--no-progress"], False),
    "measure_speed": (["--measure-speed"], True),
    "output_dir": (["--out", "out"], "out"),
    "overwrite": (["--overwrite"], True),
    "push_to_hub": (["--push-to-hub", "user/name"], "user/name"),
    "private": (["--private"], True),
    "base_model": (["--base-model", "org/model"], "org/model"),
    "evaluate": (["--evaluate", "dense"], "dense"),
    "quantize": (["--quantize", "int8_dynamic"], "int8_dynamic"),
}


def prune_flags() -> dict[str, argparse.Action]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action for action in commands.choices["prune"]._actions}


def test_every_field_has_a_cli_flag_a_recipe_key_and_a_prune_keyword():
    names = [spec.name for spec in fields(PruneConfig)]
    flags = prune_flags()
    assert set(names) <= set(flags), f"fields without a CLI flag: {set(names) - set(flags)}"
    assert all(flags[name].help for name in names)
    assert set(names) <= set(recipe_fields(hf_snp.prune))
    assert load_recipe({name: None for name in names}, recipe_fields(hf_snp.prune)).keys() == set(names)
    parameters = inspect.signature(hf_snp.prune).parameters
    for spec in fields(PruneConfig):
        assert parameters[spec.name].default == field_default(spec), spec.name
        assert spec.name in hf_snp.prune.__doc__
    assert set(EXAMPLES) == set(names), "give every new field a command-line example here"


def test_each_flag_reaches_prune_as_its_field(monkeypatch):
    received = {}
    monkeypatch.setattr(hf_snp.api, "prune", lambda recipe=None, **options: received.update(options) or _stop())
    argv = ["prune", "some-model", "--quiet"] + [token for tokens, _ in EXAMPLES.values() for token in tokens]
    with pytest.raises(_Stop):
        main(argv)
    config = PruneConfig.from_options({k: v for k, v in received.items() if k != "model"})
    for name, (_, expected) in EXAMPLES.items():
        assert getattr(config, name) == expected, name


def test_an_absent_flag_leaves_the_default(monkeypatch):
    received = {}
    monkeypatch.setattr(hf_snp.api, "prune", lambda recipe=None, **options: received.update(options) or _stop())
    with pytest.raises(_Stop):
        main(["prune", "some-model", "--out", "x"])
    assert set(received) == {"model", "output_dir", "progress"} and received["progress"] is True


def test_unknown_keyword_names_the_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['sparsty'\].*PruneConfig"):
        hf_snp.prune("some-model", sparsty=0.3)


def test_report_records_every_option():
    config = PruneConfig(calibration=torch.zeros(2, 3, dtype=torch.long), max_memory={0: "8GiB"})
    settings, everything = config.settings(), config.to_dict()
    assert set(everything) == {spec.name for spec in fields(PruneConfig)}
    assert everything["calibration"] == "<Tensor>" and everything["max_memory"] == {0: "8GiB"}
    assert set(settings) < set(everything) and "output_dir" not in settings and "method" in settings


class _Stop(Exception):
    pass


def _stop():
    raise _Stop
