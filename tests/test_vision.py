"""ViT and DeiT: exactness on built-in redundancy, identity, counts, save/reload, image calibration,
modality errors, accuracy evaluation."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from conftest import (
    IMAGE,
    TINY_VISION,
    image_logits,
    make_constant_neurons,
    pixel_values,
    sites_of,
    tiny_deit,
    tiny_deit_teacher,
    tiny_llama,
    tiny_vit,
)
from fresh_python import fresh_python
from PIL import Image
from test_heads import make_redundant_heads
from test_save_reload import BLOCK_HF_SNP  # the checkpoint's own code must do: import hf_snp raises ImportError
from transformers import AutoModelForImageClassification, ViTImageProcessor

import hf_snp
from hf_snp.setup.calibration import CalibrationError
from hf_snp.setup.images import load_image_calibration

FAMILIES = list(TINY_VISION)


def prune_images(model, **kwargs):
    kwargs.setdefault("calibration", pixel_values())
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("progress", False)
    return hf_snp.prune(model, **kwargs)


def processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def pil_images(num: int = 6, seed: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)) for _ in range(num)]


@torch.no_grad()
def copy_neurons(model, copies: int) -> None:
    """In every layer the last ``copies`` MLP neurons duplicate the first ones (GELU: exact copies only)."""
    for site in sites_of(model, "mlp"):
        fc1 = site.producer_linears[0]
        n = site.num_units
        fc1.weight[n - copies :] = fc1.weight[:copies]
        fc1.bias[n - copies :] = fc1.bias[:copies]


def one_mlp_step(model, units: int) -> float:
    site = sites_of(model, "mlp")[0]
    return units * site.params_per_step() / site.num_params()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [("mlp",), ("mlp", "heads")])
@pytest.mark.parametrize("method", ["snp", "vbp"])
def test_zero_sparsity_is_identity(family, targets, method):
    model = TINY_VISION[family]()
    before = image_logits(model)
    result = prune_images(model, method=method, targets=targets, sparsity=0.0)
    assert torch.equal(image_logits(result.model), before)
    assert result.report["params_removed"] == 0 and result.report["save_format"] == "stock"


@pytest.mark.parametrize("family", FAMILIES)
def test_snp_exact_when_removed_neurons_copy_kept_ones(family):
    model = TINY_VISION[family]()
    copy_neurons(model, 6)
    reference = image_logits(model)
    result = prune_images(copy.deepcopy(model), method="snp", sparsity=one_mlp_step(model, 6))
    assert [layer["mlp_width"] for layer in result.report["layers"]] == [42] * 3
    assert (image_logits(result.model) - reference).abs().max() < 1e-4
    baseline = prune_images(copy.deepcopy(model), method="random", sparsity=one_mlp_step(model, 6))
    assert (image_logits(baseline.model) - reference).abs().max() > 1e-2  # not vacuous


@pytest.mark.parametrize("family", FAMILIES)
def test_vbp_exact_when_removed_neurons_are_constant(family):
    model = TINY_VISION[family]()
    make_constant_neurons(model, 5)
    reference = image_logits(model)
    result = prune_images(copy.deepcopy(model), method="vbp", sparsity=one_mlp_step(model, 5))
    assert (image_logits(result.model) - reference).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_snp_heads_exact_when_a_head_is_a_multiple_of_another(family):
    model = TINY_VISION[family]()
    make_redundant_heads(model, "per_group")  # multi-head attention: head 3 = head 1 with values x0.7
    reference = image_logits(model)
    site = sites_of(model, "heads")[0]
    sparsity = site.params_removed(1) / site.num_params()
    result = prune_images(copy.deepcopy(model), method="snp", targets=("heads",), sparsity=sparsity)
    assert [layer["num_heads"] for layer in result.report["layers"]] == [3] * 3
    assert (image_logits(result.model) - reference).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["snp", "vbp"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_parameter_counts_are_as_reported_and_meet_the_budget(family, method, allocation):
    model = TINY_VISION[family]()
    before = hf_snp.count_parameters(model)
    result = prune_images(model, method=method, targets=("mlp", "heads"), sparsity=0.4, allocation=allocation)
    report = result.report
    assert report["params_before"] == before and report["params_after"] == hf_snp.count_parameters(result.model)
    sites = [s for kind in ("mlp", "heads") for s in sites_of(TINY_VISION[family](), kind)]
    targeted = sum(s.num_params() for s in sites)
    # fc2 and o_proj have biases already: VBP's mean shift adds no parameter
    assert not any(layer.get(flag) for layer in report["layers"]
                   for flag in ("mlp_output_bias_added", "attention_output_bias_added"))
    largest_step = max(s.params_per_step() for s in sites)
    assert abs(report["params_removed"] - 0.4 * targeted) \
        <= largest_step * (1 if allocation == "global" else len(sites))
    assert image_logits(result.model).shape == (4, 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_widths_save_as_the_stock_class_with_the_image_processor(family, tmp_path):
    model = TINY_VISION[family]()
    result = prune_images(model, targets=("mlp", "heads"), sparsity=0.3, image_processor=processor())
    assert result.report["save_format"] == "stock"
    result.save(str(tmp_path / "out"))
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["model_type"] == model.config.model_type and config["architectures"] == [type(model).__name__]
    assert os.path.exists(tmp_path / "out" / "preprocessor_config.json")
    loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
    assert type(loaded) is type(model)
    assert torch.allclose(image_logits(loaded), image_logits(result.model), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["snp", "vbp"])
def test_per_layer_widths_save_as_the_hf_snp_type_and_reload_without_hf_snp(family, method, tmp_path):
    model = TINY_VISION[family]()
    stock_name = type(model).__name__
    result = prune_images(model, method=method, targets=("mlp", "heads"), sparsity=0.3, layer_sparsity=[0.2, 0.4, 0.6])
    assert result.report["save_format"] == "hf_snp"
    result.save(str(tmp_path / "out"))
    pixels, out = str(tmp_path / "pixels.pt"), str(tmp_path / "logits.pt")
    torch.save(pixel_values(4, seed=7), pixels)
    reply = fresh_python(BLOCK_HF_SNP).reload(tmp_path / "out", pixels, out, "trust_remote_code=True",
                                              auto="AutoModelForImageClassification", input_name="pixel_values")
    name = reply["class"]
    assert name == "HfSnp" + stock_name and not reply["hf_snp_loaded"]
    assert torch.allclose(torch.load(out), image_logits(result.model), atol=1e-5)
    # in-process, with hf_snp imported, the Auto class picks the same head by config.architectures
    local = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
    assert type(local).__name__ == name and torch.allclose(image_logits(local), image_logits(result.model), atol=1e-5)


def test_a_layer_without_heads_runs_and_reloads(tmp_path):
    model = tiny_deit_teacher()
    result = prune_images(model, targets=("heads",), sparsity=0.5, layer_sparsity=[0.0, 0.99, 0.5])
    assert [layer["num_heads"] for layer in result.report["layers"]] == [4, 0, 2]
    result.save(str(tmp_path / "out"))
    loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
    assert torch.allclose(image_logits(loaded), image_logits(result.model), atol=1e-5)


def test_block_removal_on_vit_saves_fewer_layers(tmp_path):
    model = TINY_VISION["vit"]()
    result = prune_images(model, targets=("blocks",), sparsity=0.3)
    assert result.model.config.num_hidden_layers == 2 and result.report["save_format"] == "stock"
    result.save(str(tmp_path / "out"))
    loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
    assert torch.allclose(image_logits(loaded), image_logits(result.model), atol=1e-5)


# ---- image calibration -------------------------------------------------------------------------


def _write_folder(root, images, labels=None) -> str:
    for i, image in enumerate(images):
        folder = os.path.join(root, f"class{labels[i]}" if labels is not None else "")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{i:03d}.png"))
    return str(root)


def test_every_image_source_gives_the_same_pixel_values(tmp_path):
    import datasets

    images = pil_images(6)
    expected = processor()(images=images, return_tensors="pt")["pixel_values"]
    folder = _write_folder(tmp_path / "images", images)
    dataset = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    for source in (images, folder, dataset, expected, {"pixel_values": expected}):
        calib = load_image_calibration(source, processor(), num_samples=6, seed=0, tokens_per_sample=18)
        assert torch.allclose(calib.pixel_values, expected, atol=1e-6), type(source).__name__
        assert calib.num_tokens == 6 * 18


def test_more_images_than_samples_draws_a_seeded_subset():
    images = pil_images(10)
    a = load_image_calibration(images, processor(), num_samples=4, seed=0, tokens_per_sample=1).pixel_values
    b = load_image_calibration(images, processor(), num_samples=4, seed=0, tokens_per_sample=1).pixel_values
    c = load_image_calibration(images, processor(), num_samples=4, seed=1, tokens_per_sample=1).pixel_values
    assert a.shape[0] == 4 and torch.equal(a, b) and not torch.equal(a, c)


def test_prune_from_a_directory_loads_the_image_processor_and_counts_every_token(tmp_path):
    model = tiny_deit()
    model.save_pretrained(tmp_path / "dense")
    processor().save_pretrained(tmp_path / "dense")
    folder = _write_folder(tmp_path / "images", pil_images(8))
    result = hf_snp.prune(str(tmp_path / "dense"), calibration=folder, sparsity=0.3, num_samples=8, batch_size=4,
                          progress=False, output_dir=str(tmp_path / "out"))
    assert result.report["calibration_tokens"] == 8 * (16 + 2)  # 16 patches + CLS + distillation
    assert os.path.exists(tmp_path / "out" / "preprocessor_config.json")
    card = open(tmp_path / "out" / "README.md").read()
    assert "AutoModelForImageClassification" in card and "pipeline_tag: image-classification" in card


@pytest.mark.parametrize("family, tokens", [("vit", 16 + 1), ("deit", 16 + 2)])
def test_statistics_cover_every_token_including_cls_and_distillation(family, tokens):
    from hf_snp.passes.block_inputs import capture_block_inputs

    model = TINY_VISION[family]()
    adapter = hf_snp.get_adapter(model.config)
    assert adapter.tokens_per_sample(model.config) == tokens
    calib = load_image_calibration(pixel_values(), None, 12, 0, tokens_per_sample=tokens)
    inputs = capture_block_inputs(model, adapter.layers(model), calib, 4, torch.device("cpu"), progress=False)
    assert sum(item.hidden.shape[0] * item.hidden.shape[1] for item in inputs) == calib.num_tokens == 12 * tokens
    assert all(item.token_mask is None for item in inputs)  # no token is left out of the statistics


@pytest.mark.parametrize("calibration, words", [
    ("wikitext2", "default calibration 'wikitext2' is text"),
    (["some text", "more text"], "is text"),
    (torch.randint(0, 50, (4, 8)), "is text"),
    ("self", "is text ('self')"),  # text the model would write itself: no image model writes it
    ("chat-local", "is text ('chat-local')"),
    ({"self": 0.75, "wikitext2": 0.25}, "is text ({'self': 0.75, 'wikitext2': 0.25})"),
])
def test_image_model_with_text_calibration_fails_at_once(calibration, words, no_long_work):
    with pytest.raises(CalibrationError, match="image model") as error:
        hf_snp.prune(tiny_deit(), calibration=calibration, progress=False)
    assert words in str(error.value)


def test_image_model_directory_with_text_calibration_fails_before_loading(tmp_path, no_long_work):
    tiny_deit().save_pretrained(tmp_path / "dense")
    with pytest.raises(CalibrationError, match="image model"):
        hf_snp.prune(str(tmp_path / "dense"), calibration="wikitext2-local", progress=False)


@pytest.mark.parametrize("kind", ["pil", "pixels", "folder"])
def test_text_model_with_image_calibration_fails_at_once(kind, tmp_path, no_long_work):
    calibration = {"pil": pil_images(2), "pixels": pixel_values(2),
                   "folder": _write_folder(tmp_path / "im", pil_images(2))}[kind]
    with pytest.raises(CalibrationError, match="is a text model, but calibration is images"):
        hf_snp.prune(tiny_llama(), calibration=calibration, progress=False)


def test_images_without_an_image_processor_say_what_to_pass(no_long_work):
    with pytest.raises(CalibrationError, match="image_processor="):
        hf_snp.prune(tiny_deit(), calibration=pil_images(2), progress=False)


# ---- accuracy ----------------------------------------------------------------------------------


def test_evaluate_accuracy_counts_top1_and_top5():
    import datasets

    model = tiny_vit()
    images = pil_images(10)
    pixels = processor()(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    ranked = logits.argsort(dim=-1, descending=True)
    labels = torch.cat([ranked[:4, 0], ranked[4:7, 3], ranked[7:, 6]])  # 4 top-1 hits, 3 more in the top 5, 3 misses
    expected = {"top1": 0.4, "top5": 0.7, "num_samples": 10}
    assert hf_snp.evaluate_accuracy(model, (pixels, labels), batch_size=3, progress=False) == expected
    dataset = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}) \
        .cast_column("image", datasets.Image())
    assert hf_snp.evaluate_accuracy(model, dataset, processor(), batch_size=4, progress=False) == expected


def test_cli_eval_image_classification_on_an_imagefolder(tmp_path, capsys):
    from hf_snp.cli import main

    model = tiny_vit()
    model.save_pretrained(tmp_path / "model")
    processor().save_pretrained(tmp_path / "model")
    images = pil_images(6)
    _write_folder(tmp_path / "data", images, labels=[0, 1, 2, 0, 1, 2])
    assert main(["eval", str(tmp_path / "model"), "--task", "image-classification", "--dataset", str(tmp_path / "data"),
                 "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"]["num_samples"] == 6 and 0 <= result["accuracy"]["top1"] <= result["accuracy"]["top5"] <= 1
    import datasets

    data = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "data"), split="train")
    assert result["accuracy"]["top1"] == hf_snp.evaluate_accuracy(model, data, processor(), progress=False)["top1"]


def test_a_hub_image_dataset_is_streamed_and_sampled_with_the_seed(monkeypatch):
    """The Hub boundary replaced: ``datasets.load_dataset(name, split=..., streaming=True)``."""
    import datasets

    import hf_snp.setup.datasets

    images = pil_images(12)
    calls = []

    def fake_load_dataset(path, config=None, split=None, data_files=None, streaming=False):
        calls.append((path, split, streaming))
        return datasets.IterableDataset.from_generator(lambda: ({"image": image, "label": 0} for image in images))

    monkeypatch.setattr(hf_snp.setup.datasets, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    a = load_image_calibration("user/images:train", processor(), num_samples=5, seed=0, tokens_per_sample=17)
    b = load_image_calibration("user/images:train", processor(), num_samples=5, seed=0, tokens_per_sample=17)
    assert calls[0] == ("user/images", "train", True) and a.pixel_values.shape == (5, 3, IMAGE, IMAGE)
    assert torch.equal(a.pixel_values, b.pixel_values) and "user/images:train: 5 images, seed 0" == a.source


def test_a_hub_image_dataset_offline_fails_with_what_to_do_instead(monkeypatch):
    import hf_snp.setup.datasets

    monkeypatch.setattr(hf_snp.setup.datasets, "hub_reachable", lambda: False)
    with pytest.raises(CalibrationError, match="not reachable; give a local folder of images"):
        load_image_calibration("user/images", processor(), num_samples=5, seed=0, tokens_per_sample=17)


def test_cli_prunes_a_deit_directory_with_a_folder_of_images_then_evaluates_it(tmp_path, capsys):
    from hf_snp.cli import main

    tiny_deit_teacher().save_pretrained(tmp_path / "dense")
    processor().save_pretrained(tmp_path / "dense")
    images = pil_images(8)
    _write_folder(tmp_path / "calib", images)
    _write_folder(tmp_path / "data", images, labels=[0, 1, 2, 3, 0, 1, 2, 3])
    out = str(tmp_path / "out")
    assert main(["prune", str(tmp_path / "dense"), "--calibration", str(tmp_path / "calib"), "--num-samples", "8",
                 "--targets", "mlp,heads", "--sparsity", "0.3", "--out", out, "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params_after"] < summary["params_before"] and summary["save_format"] == "stock"
    assert main(["eval", out, "--task", "image-classification", "--dataset", str(tmp_path / "data"), "--save",
                 "--quiet"]) == 0
    accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    assert accuracy["num_samples"] == 8
    assert json.load(open(os.path.join(out, "hf_snp_report.json")))["metrics"]["accuracy"]["top1"] == accuracy["top1"]
    # a text model's flags with an image task are refused with a message
    assert main(["eval", out, "--task", "image-classification", "--dataset", str(tmp_path / "data"), "--ppl",
                 "wikitext2"]) == 2
    assert "for language models" in capsys.readouterr().err


def test_a_directory_without_an_image_processor_needs_one_only_for_images(tmp_path):
    tiny_deit().save_pretrained(tmp_path / "dense")  # no preprocessor_config.json
    with pytest.raises(ValueError, match=r"image calibration needs the model's image processor.*pass image_processor="):
        hf_snp.prune(str(tmp_path / "dense"), calibration=pil_images(4), progress=False)
    result = hf_snp.prune(str(tmp_path / "dense"), calibration=pixel_values(), sparsity=0.3, progress=False)
    assert result.image_processor is None and result.report["params_removed"] > 0
