"""A new user's first hour (issue 30): the model card, early refusals, one-line errors for bad sources, a quiet and
fast command line, file modes, the report's resolved settings, and the demo's options (issue 26)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import subprocess
import sys

import pytest
import yaml
from conftest import TINY, prune_quiet, run_python

import hf_snp.api
import hf_snp.setup.loading as loading
from hf_snp.cli import _shown, build_parser, main
from hf_snp.config import PruneConfig
from hf_snp.deliver.card import model_card
from hf_snp.deliver.report import PruneReport
from hf_snp.demo import DEMO_OPTIONS, DEMO_OVERRIDES


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture
def dense_dir(tmp_path):
    model = TINY["llama"]()
    model.config._model_name_or_path = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # as a GGUF file's general.name sets it
    model.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


@pytest.fixture
def forbid_loading(monkeypatch):
    """Loading weights is the long work every refusal must come before: fail loudly if it is reached."""
    reached = []

    def forbidden(*args, **kwargs):
        reached.append(True)
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(hf_snp.api, "load_model", forbidden)
    return reached


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


# 1. the model card


def test_the_card_of_a_known_source_names_it_its_license_and_the_change(dense_dir, tmp_path, monkeypatch, capsys):
    """The demo's source (a Hub id and a license known without the network): the card's front matter carries
    base_model, base_model_relation and license; the title names the model and the change; the load snippet names
    the folder; config.json keeps no GGUF name; `hf-snp report` names the model."""
    known = loading.ModelSource(str(dense_dir), None, loading.DEMO_HUB_ID, loading.DEMO_LICENSE)
    monkeypatch.setattr(loading, "demo_model_source", lambda: known)
    out = tmp_path / "smollm2-snp25"
    result = prune_quiet("smollm2-demo", sparsity=0.25, output_dir=str(out))
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "pruned"
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert "# SmolLM2-135M-Instruct, 25% of MLP neurons removed with SNP\n" in card
    assert "repo = 'smollm2-snp25'" in card and "PATH_OR_REPO" not in card and "pruned with hf_snp\n" not in card
    assert result.report["base_model"] == result.report["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert result.report["license"] == "apache-2.0"
    assert "_model_name_or_path" not in json.loads((out / "config.json").read_text())
    assert main(["report", str(out)]) == 0
    assert "model        HuggingFaceTB/SmolLM2-135M-Instruct (llama" in capsys.readouterr().out


def test_the_report_table_names_a_local_model_by_its_name(tmp_path, capsys):
    prune_quiet(TINY["llama"](), sparsity=0.25, output_dir=str(tmp_path / "out"))
    assert main(["report", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("model        llama (llama, saved as stock)")  # was 'None (llama'


def test_the_license_comes_from_the_source_or_its_gguf_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_gguf_metadata", lambda source: {"general.license": "mit"})
    assert loading.model_license(loading.ModelSource(str(tmp_path), "m.gguf")) == "mit"
    assert loading.model_license(loading.ModelSource(str(tmp_path), "m.gguf", license="apache-2.0")) == "apache-2.0"
    assert loading.model_license(loading.ModelSource(str(tmp_path))) is None  # a local folder: nothing claimed
    assert loading.model_license(None) is None


def test_the_card_shows_metrics_with_labels_and_protocols_as_sentences():
    report = PruneReport(base_model="org/base", model_type="llama", method="vbp", sparsity=0.3, targets=["mlp"],
                         sparsity_per_target={"mlp": 0.3}, params_before=10, params_after=8, save_format="stock",
                         metrics={"perplexity_before": 15.0, "perplexity_after": 17.25, "kl_text": 0.1234,
                                  "agreement_text": 0.875, "empty_reply_share": 0.05,
                                  "perplexity_protocol": "WikiText-2 test, the first 12 windows of 512 tokens"})
    card = model_card(report)
    assert "# base, 30% of MLP neurons removed with VBP\n" in card
    assert "| perplexity, dense -> pruned | 15.00 -> 17.25 |" in card
    assert "| KL divergence to the dense model, text (nats per token) | 0.1234 |" in card
    assert "| top-1 agreement with the dense model, text | 87.5% |" in card
    assert "| share of empty chat replies | 5.0% |" in card
    assert "Perplexity measured on WikiText-2 test, the first 12 windows of 512 tokens." in card
    assert "_protocol" not in card and "kl_text" not in card and "repo = '.'" in card


# 2. refusals before the weights load


def test_the_demo_rerun_is_refused_before_any_weights_load(tmp_path, forbid_loading, monkeypatch, capsys):
    out = tmp_path / "smollm2-snp30"
    out.mkdir()
    (out / "model.safetensors").write_text("from the first run")
    assert main(["demo", "--out", str(out)]) == 2
    assert "exists and is not empty; pass overwrite=True (--overwrite)" in error_line(capsys)
    assert main(["demo", "--out", str(tmp_path / "new"), "--sparsity", "1.5"]) == 2
    assert "sparsity must be a fraction" in error_line(capsys)
    assert not forbid_loading and (out / "model.safetensors").read_text() == "from the first run"
    printed = run_python(f"""
        import sys
        from hf_snp.cli import main
        assert main(["demo", "--out", {str(out)!r}]) == 2
        assert main(["prune", "some/model", "--out", {str(out)!r}]) == 2
        print("heavy:", sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """)
    assert "heavy: []" in printed  # refused before the seconds of importing torch and transformers


# 3. one line for a bad model source


def test_a_missing_local_path_says_it_does_not_exist(tmp_path, forbid_loading, capsys):
    assert main(["prune", "./no/such/model", "--out", str(tmp_path / "o")]) == 2
    assert "model path './no/such/model' does not exist" in error_line(capsys)


def test_a_malformed_hub_id_says_what_a_hub_id_looks_like(tmp_path, forbid_loading, capsys):
    assert main(["prune", "org/na me", "--out", str(tmp_path / "o")]) == 2
    assert "is neither a path on this machine nor a valid Hub id" in error_line(capsys)


def test_a_hub_id_offline_names_hf_hub_offline(tmp_path, forbid_loading, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["prune", "hf-snp-tests/no-such-model", "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert "not in the local Hugging Face cache" in line and "HF_HUB_OFFLINE=1" in line


def test_a_hub_id_without_network_suggests_hf_hub_offline(tmp_path, forbid_loading, monkeypatch, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        try:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        except LocalEntryNotFoundError as cause:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from cause

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", unreachable)
    assert main(["prune", "org/model", "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert "could not reach the Hugging Face Hub" in line and "set HF_HUB_OFFLINE=1" in line


def test_a_missing_gguf_file_is_named(dense_dir, tmp_path, forbid_loading, capsys):
    assert main(["prune", str(tmp_path / "model.Q4.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "GGUF file" in error_line(capsys)
    assert main(["prune", str(dense_dir), "--gguf-file", "model.Q4.gguf", "--out", str(tmp_path / "o")]) == 2
    assert f"GGUF file 'model.Q4.gguf' is not in '{dense_dir}' (it has no .gguf file)" in error_line(capsys)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["prune", "./no/such/model", "--out", str(tmp_path / "o"), "--debug"])


# 4 and 5. a quiet, fast command line


def test_help_imports_no_torch_and_import_hf_snp_no_heavy_extra():
    """In fresh processes: the parser answers --help without torch or transformers; `import hf_snp` imports none of
    torch, transformers, torchao, lm_eval, matplotlib; `python -m hf_snp` is the command line."""
    printed = run_python("""
        import sys
        from hf_snp.cli import main
        for argv in (["--help"], ["prune", "--help"], ["demo", "--help"]):
            try:
                main(argv)
            except SystemExit as done:
                assert done.code == 0
        print("heavy:", sorted(m for m in ("torch", "transformers", "torchao") if m in sys.modules))
    """)
    assert "heavy: []" in printed and "what to prune and how:" in printed and "calibration data:" in printed
    printed = run_python("""
        import sys
        import hf_snp
        assert callable(hf_snp.PruneConfig) and hf_snp.__version__
        print("heavy:", sorted(m for m in ("torch", "transformers", "torchao", "lm_eval", "matplotlib")
                                if m in sys.modules))
    """)
    assert "heavy: []" in printed
    done = subprocess.run([sys.executable, "-m", "hf_snp", "prune", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m hf_snp prune"), done.stderr


def test_loading_transformers_models_prints_no_third_party_noise():
    """torchao's "Failed to load ...so" and "Detected no triton" and torch's Enum deprecation are filtered (where
    this torchao prints them), with logging configured as the command line does; the public names still resolve."""
    code = ("import logging\nimport hf_snp\nlogging.basicConfig(level=logging.INFO)  # as the command line does\n"
            "from transformers import LlamaForCausalLM\nprint(hf_snp.get_adapter.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "get_adapter", done.stderr
    for noise in ("Failed to load", "is an Enum subclass", "Detected no triton"):
        assert noise not in done.stderr, done.stderr


def test_the_noise_filter_drops_only_those_messages():
    import hf_snp

    quiet = hf_snp._QuietThirdParty()

    def record(name, message):
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)

    assert not quiet.filter(record("torchao", "Failed to load /x/_C_mxfp8.so: Could not load this library"))
    assert not quiet.filter(record("torch.utils._pytree", "<enum 'K'> is an Enum subclass and is now natively "
                                                          "supported by torch.compile"))
    assert not quiet.filter(record("torchao.kernel.intmm", "Warning: Detected no triton, on systems without ..."))
    assert quiet.filter(record("torchao", "Skipping import of cpp extensions"))
    assert quiet.filter(record("torch.utils._pytree", "something else"))


def test_saved_hf_snp_types_load_after_a_plain_import(tmp_path):
    """`import hf_snp` registers nothing eagerly, yet transformers finds hf_snp's types when it meets one."""
    prune_quiet(TINY["llama"](), sparsity=0.25, layer_sparsity={0: 0.0}, output_dir=str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"].startswith("hf_snp_")
    printed = run_python(f"""
        import sys
        import hf_snp
        assert "hf_snp.adapters" not in sys.modules
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r})
        print(type(model).__module__)
    """)
    assert printed.strip().startswith("hf_snp.models")


# 6. grouped help with defaults, short errors


def test_prune_help_is_grouped_with_defaults():
    prune = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]
    text = prune.format_help()
    for title in ("what to prune and how:", "calibration data:", "loading the model:", "running:",
                  "saving and uploading:"):
        assert title in text
    assert "(default: snp)" in text and "(default: 128)" in text and "(default: 0.3)" in text
    assert len(prune.format_usage().splitlines()) == 1


def test_a_misspelled_choice_or_option_gets_a_short_did_you_mean(capsys):
    with pytest.raises(SystemExit) as done:
        main(["prune", "m", "--method", "snpp"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "did you mean 'snp'?" in err and len(err.splitlines()) <= 2
    with pytest.raises(SystemExit):
        main(["prune", "m", "--gqa-mode", "per_grop"])
    assert "did you mean 'per_group'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "m", "--sparsty", "0.3", "--out", "o"])
    assert "did you mean --sparsity?" in capsys.readouterr().err


# 7. file modes


def test_saved_files_get_ordinary_modes(tmp_path):
    old = os.umask(0o022)
    try:
        prune_quiet(TINY["llama"](), sparsity=0.25, output_dir=str(tmp_path / "out"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) for name in os.listdir(tmp_path / "out")}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


# 8. resolved settings at the report's top level


def test_the_report_top_level_holds_the_settings_as_used():
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    snp = prune_quiet(wide, sparsity=0.25, targets=("mlp", "heads")).report
    assert (snp["ordering"], snp["ridge"]) == ("obs", "heldout")
    assert snp["round_to"] == {"mlp": 8, "heads": 1} and snp["allocation"]["mode"] == "uniform"
    assert snp["calibration"].startswith("tensor")
    vbp = prune_quiet(TINY["llama"](), method="vbp", sparsity=0.25, round_to=4, ordering="zca").report
    assert (vbp["ordering"], vbp["ridge"], vbp["round_to"]) == ("zca", None, {"mlp": 4})
    fixed = prune_quiet(TINY["llama"](), sparsity=0.25, reconstruct=False).report
    assert (fixed["ordering"], fixed["ridge"], fixed["round_to"]) == ("zca", None, {"mlp": 1})


# 9. the demo's options are PruneConfig's with the demo's defaults


def test_the_demo_takes_prune_config_options_with_its_overrides(monkeypatch, capsys):
    demo = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["demo"]
    fields = set(PruneConfig.__dataclass_fields__)
    dests = {a.dest for a in demo._actions} - {"help", "eval_windows", "quiet", "verbose", "debug"}
    assert dests <= fields and all(a.help for a in demo._actions)
    text = " ".join(demo.format_help().split())
    shown = [name for name in DEMO_OPTIONS if name in DEMO_OVERRIDES]
    assert shown and all(f"(default: {_shown(DEMO_OVERRIDES[name])})" in text for name in shown), text
    seen = []

    def stop(model, tokenizer, image_processor, config):
        seen.append((model, config))
        raise ValueError("stopped for the test")

    monkeypatch.setattr(hf_snp.api, "resolve", stop)
    assert main(["demo", "--num-samples", "64", "--method", "vbp"]) == 2
    assert main(["demo"]) == 2
    (model, asked), (_, default) = seen
    assert model == "smollm2-demo"
    assert (asked.num_samples, asked.method, asked.output_dir) == (64, "vbp", "smollm2-vbp30")
    for name, value in DEMO_OVERRIDES.items():
        assert getattr(default, name) == value, name
    assert default.output_dir == "smollm2-snp30" and default.sparsity == PruneConfig().sparsity
