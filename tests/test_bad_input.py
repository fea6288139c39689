"""Bad input fails at once with a message that says what is wrong, before any long work."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_ids, tiny_llama
from transformers import BloomConfig, BloomForCausalLM

import hf_snp
from hf_snp.setup.calibration import CalibrationError


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.3", True])
def test_sparsity_outside_unit_interval(sparsity, no_long_work):
    with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\)"):
        hf_snp.prune(tiny_llama(), sparsity=sparsity, calibration=calibration_ids())


def test_unknown_method(no_long_work):
    with pytest.raises(ValueError, match=r"unknown method 'obs'; choose one of "
                                         r"\['flap', 'magnitude', 'random', 'snp', 'vbp', 'wanda_sp'\]"):
        hf_snp.prune(tiny_llama(), method="obs", calibration=calibration_ids())


@pytest.mark.parametrize("targets", [("mlp", "bogus"), "embeddings", ()])
def test_unknown_or_empty_target(targets, no_long_work):
    with pytest.raises(ValueError, match="target"):
        hf_snp.prune(tiny_llama(), targets=targets, calibration=calibration_ids())


def test_unsupported_architecture_names_the_supported_families(tmp_path, no_long_work):
    bloom = BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50)
    BloomForCausalLM(bloom).save_pretrained(tmp_path / "bloom")
    message = (r"cannot prune model_type 'bloom'. Supported families: .*Llama family \(llama, mistral, qwen2[^)]*\)"
               r".*OPT \(opt\).* see 'Adding a family' in the README")
    with pytest.raises(ValueError, match=message):
        hf_snp.prune(str(tmp_path / "bloom"), calibration=calibration_ids())
    with pytest.raises(ValueError, match=message):
        hf_snp.prune(BloomForCausalLM(bloom), calibration=calibration_ids())


@pytest.mark.parametrize(
    "calibration, message",
    [
        ([], "is empty"),
        (["", "   "], "is empty"),
        (torch.zeros(0, 16, dtype=torch.long), "is empty"),
        (torch.rand(4, 16), "LongTensor"),
        (42, "unsupported calibration of type int"),
        ("no-such-dataset-or-file", "neither a known dataset"),
    ],
)
def test_empty_or_malformed_calibration(calibration, message, no_long_work):
    with pytest.raises(CalibrationError, match=message):
        hf_snp.prune(tiny_llama(), tokenizer=object(), calibration=calibration)


def test_calibration_shorter_than_seq_len(tmp_path, no_long_work):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    path = tmp_path / "calib.txt"
    path.write_text("hello world " * 10)
    with pytest.raises(CalibrationError,
                       match=r"has 20 tokens, fewer than seq_len=64: give more text or a smaller seq_len"):
        hf_snp.prune(tiny_llama(), tokenizer=tokenizer, calibration=str(path), seq_len=64)


def test_text_calibration_without_tokenizer(no_long_work):
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        hf_snp.prune(tiny_llama(), calibration=["some text"])


def test_bad_layer_sparsity(no_long_work):
    with pytest.raises(ValueError, match=r"layer_sparsity\[2\] must be a fraction"):
        hf_snp.prune(tiny_llama(), layer_sparsity={2: 1.2}, calibration=calibration_ids())


def test_layer_sparsity_naming_a_missing_layer():
    with pytest.raises(ValueError, match=r"names layer 9, but the model has layers 0..3"):
        hf_snp.prune(tiny_llama(), layer_sparsity={9: 0.2}, calibration=calibration_ids(), progress=False)


def test_non_empty_output_dir_is_refused(tmp_path, no_long_work):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.bin").write_text("x")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        hf_snp.prune(tiny_llama(), calibration=calibration_ids(), output_dir=str(tmp_path / "out"))
    assert (tmp_path / "out" / "precious.bin").read_text() == "x"


def test_non_finite_activations_name_the_site():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="layer 2 mlp"):
        hf_snp.prune(model, calibration=calibration_ids(), progress=False)


@pytest.mark.parametrize("options", [dict(targets=("mlp", "heads")), dict(targets=("heads",), allocation="global")])
def test_a_result_the_save_format_would_refuse_fails_before_pruning(options, no_long_work, monkeypatch):
    """The save format's config is asked about the predicted shapes in preflight, not after the work."""
    import hf_snp.deliver.save_format

    asked = []

    def refuse(config_cls, config):
        asked.append(getattr(config, "hf_snp_layers", None))
        return "ValueError: refused for the test"

    monkeypatch.setattr(hf_snp.deliver.save_format, "config_rejection", refuse)
    with pytest.raises(ValueError, match=r"could not be saved: .* refuses it: ValueError: refused for the test"):
        hf_snp.prune(tiny_llama(), sparsity=0.5, calibration=calibration_ids(), **options)
    assert asked


def test_preflight_predicts_the_uniform_shapes(monkeypatch, no_long_work):
    """Uniform 50% of a 4-head GQA layer (2 KV groups, per_group): 2 heads and MLP 24 in every layer."""
    import hf_snp.setup.preflight

    seen = []
    original = hf_snp.setup.preflight.check_save_format
    monkeypatch.setattr(hf_snp.setup.preflight, "check_save_format",
                        lambda adapter, config, shapes=None: seen.append(shapes) or original(adapter, config, shapes))
    with pytest.raises(AssertionError, match="long work started"):
        hf_snp.prune(tiny_llama(), sparsity=0.5, targets=("mlp", "heads"), calibration=calibration_ids())
    (shapes,) = seen
    assert [(s.intermediate_size, s.num_attention_heads, s.num_key_value_heads) for s in shapes] == [(24, 2, 2)] * 4


def test_overwrite_never_replaces_a_folder_that_holds_no_saved_model(tmp_path, no_long_work):
    """--overwrite replaces the whole folder: a source tree or any folder without a model is refused before work."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds files but no saved model"):
        hf_snp.prune(tiny_llama(), calibration=calibration_ids(), output_dir=str(folder), overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"
    (folder / "config.json").write_text("{}")  # a saved model's folder may be replaced
    from hf_snp.setup.output_dir import prepare_output_dir

    prepare_output_dir(str(folder), overwrite=True)
