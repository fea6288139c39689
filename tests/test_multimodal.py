"""Vision-language wrappers (issue 14): Gemma 3 (``Gemma3ForConditionalGeneration``) and Llava over Llama and Qwen2.
hf_snp prunes the language model (``model.language_model.layers``, shapes in ``config.text_config``) from text
calibration and leaves the vision tower and projector as they are. Checked: exactness on planted redundancy (MLP
and heads, both GQA modes), also on inputs with an image; the vision weights untouched; block removal renumbering
the text config's per-layer fields; uniform results saved as the stock wrapper class and per-layer results as its
variable-width type, reloaded in fresh processes (without hf_snp, and with it) to the same logits and tokens."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import VOCAB, eval_ids, logits, make_scaled_copies, prune_quiet, sites_of, sparsity_removing
from fresh_python import fresh_python
from test_families import make_redundant_heads

IMAGE_TOKEN = VOCAB + 3  # beyond the calibration and evaluation ids (0..VOCAB-1)
TEXT = dict(vocab_size=VOCAB + 4, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)


def _noisy_norms(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def tiny_gemma3(seed: int = 0, layers: int = 4):
    """Gemma 3 with a SigLIP tower: the text model is tiny_gemma3_text's (sliding/full layer types, q/k norms)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(seed)
    types = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    text = Gemma3TextConfig(**TEXT, num_hidden_layers=layers, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=8, layer_types=types, final_logit_softcapping=3.0)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=SiglipVisionConfig(**VISION).to_dict(),
                          mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=VOCAB + 1,
                          eoi_token_index=VOCAB + 2)
    return _noisy_norms(Gemma3ForConditionalGeneration(config))


def tiny_llava(seed: int = 0, layers: int = 4, text_type: str = "llama"):
    """Llava with a CLIP tower over a Llama or Qwen2 language model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    torch.manual_seed(seed)
    text = {"llama": LlamaConfig, "qwen2": Qwen2Config}[text_type](**TEXT, num_hidden_layers=layers)
    vision = CLIPVisionConfig(**VISION, projection_dim=16)
    config = LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-1)
    return _noisy_norms(LlavaForConditionalGeneration(config))


WRAPPERS = {"gemma3": tiny_gemma3, "llava-llama": tiny_llava,
            "llava-qwen2": lambda seed=0, layers=4: tiny_llava(seed, layers, "qwen2")}
STOCK_CLASS = {"gemma3": "Gemma3ForConditionalGeneration", "llava-llama": "LlavaForConditionalGeneration",
               "llava-qwen2": "LlavaForConditionalGeneration"}


def image_inputs(model) -> dict:
    """Token ids with one image's placeholder tokens, and the image."""
    config = model.config
    count = getattr(config, "mm_tokens_per_image", None) or (VISION["image_size"] // VISION["patch_size"]) ** 2
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, count), IMAGE_TOKEN), eval_ids()[:1, :10]], dim=1)
    pixels = torch.randn(1, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "pixel_values": pixels}


@torch.no_grad()
def image_logits(model) -> torch.Tensor:
    return model(**image_inputs(model)).logits


def vision_state(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items() if "language_model" not in name
            and "lm_head" not in name}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_mlp_exact_on_planted_copies_and_the_vision_tower_untouched(wrapper):
    model = WRAPPERS[wrapper]()
    make_scaled_copies(model, 12)
    reference, reference_image, vision = logits(model), image_logits(model), vision_state(model)
    result = prune_quiet(copy.deepcopy(model), method="snp", sparsity=sparsity_removing(model, 12))
    assert [layer["mlp_width"] for layer in result.report["layers"]] == [36] * 4
    assert result.report["save_format"] == "stock" and result.model.config.text_config.intermediate_size == 36
    assert (logits(result.model) - reference).abs().max() < 1e-4
    assert (image_logits(result.model) - reference_image).abs().max() < 1e-4  # image tokens were never calibrated
    after = vision_state(result.model)
    assert after.keys() == vision.keys() and all(torch.equal(after[name], vision[name]) for name in vision)
    baseline = prune_quiet(model, method="random", sparsity=sparsity_removing(model, 12))
    assert (logits(baseline.model) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["per_group", "kv_groups"])
@pytest.mark.parametrize("wrapper", ["gemma3", "llava-qwen2"])
def test_heads_exact_on_planted_copies(wrapper, mode):
    model = WRAPPERS[wrapper]()
    make_redundant_heads(model, mode)
    reference = logits(model)
    site = sites_of(model, "heads", mode)[0]
    assert site.head_dim == (16 if wrapper == "gemma3" else 8)  # the text config's, not the wrapper's
    result = prune_quiet(copy.deepcopy(model), method="snp", targets=("heads",), gqa_mode=mode,
                         sparsity=site.params_removed(1) / site.num_params())
    heads = (2, 2) if mode == "per_group" else (2, 1)
    assert [(layer["num_heads"], layer["num_kv_heads"]) for layer in result.report["layers"]] == [heads] * 4
    assert (result.model.config.text_config.num_attention_heads,
            result.model.config.text_config.num_key_value_heads) == heads
    assert (logits(result.model) - reference).abs().max() < 1e-4


def test_removing_a_block_renumbers_the_text_configs_layer_types(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = tiny_gemma3()
    with torch.no_grad():
        model.model.language_model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.language_model.layers[1].mlp.down_proj.weight.zero_()
    reference = logits(model)
    result = prune_quiet(model, targets=("blocks",), sparsity=0.25, output_dir=str(tmp_path / "out"))
    assert [layer["source_layer"] for layer in result.report["layers"]] == [0, 2, 3]
    text = result.model.config.text_config
    assert text.num_hidden_layers == 3 and text.layer_types == ["sliding_attention", "sliding_attention",
                                                                "full_attention"]
    assert torch.allclose(logits(result.model), reference, atol=1e-5)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert torch.allclose(logits(reloaded), reference, atol=1e-5)


def test_a_text_tower_hf_snp_cannot_prune_is_refused_before_any_work(no_long_work):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Phi3Config

    text = Phi3Config(**{**TEXT, "pad_token_id": 0}, num_hidden_layers=2)  # fused qkv_proj: not a Llama-family tower
    config = LlavaConfig(text_config=text.to_dict(), vision_config=CLIPVisionConfig(**VISION).to_dict(),
                         image_token_index=IMAGE_TOKEN)
    with pytest.raises(ValueError, match=r"language model of a llava model .* text_config is 'phi3'"):
        prune_quiet(LlavaForConditionalGeneration(config).eval(), sparsity=0.3)


# ---------------------------------------------------------------------------------------------- save and reload

PROMPT = [[3, 4, 5, 6]]


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("kind", ["uniform", "per_layer"])
def test_saved_wrapper_reloads_in_a_fresh_process_to_the_same_logits_and_tokens(wrapper, kind, tmp_path):
    model = WRAPPERS[wrapper](layers=3)
    out = tmp_path / "out"
    if kind == "uniform":
        result = prune_quiet(model, method="snp", targets=("mlp", "heads"), sparsity=0.5, gqa_mode="kv_groups",
                             output_dir=str(out))
    else:  # per-layer widths, VBP's added biases, the last layer loses every head
        result = prune_quiet(model, method="vbp", targets=("mlp", "heads"), sparsity=0.3,
                             layer_sparsity={0: 0.0, 2: 0.999}, output_dir=str(out))
    config = json.load(open(out / "config.json"))
    base_type = "gemma3" if wrapper == "gemma3" else "llava"
    if kind == "uniform":
        assert result.report["save_format"] == "stock" and config["model_type"] == base_type
        assert "auto_map" not in config and config["text_config"]["intermediate_size"] == 24
        setups = [("sys.modules['hf_snp'] = None", "")]
    else:
        assert result.report["save_format"] == "hf_snp" and config["model_type"] == f"hf_snp_{base_type}"
        assert config["hf_snp_layout"]["layers"] == "model.language_model.layers"
        assert result.report["layers"][2]["num_heads"] == 0
        setups = [("sys.modules['hf_snp'] = None", "trust_remote_code=True"), ("import hf_snp", "")]
    torch.save(eval_ids(), tmp_path / "ids.pt")
    with torch.no_grad():
        expected = logits(result.model)
        tokens = result.model.generate(torch.tensor(PROMPT), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for block, kwargs in setups:
        target = tmp_path / f"{len(kwargs)}.pt"
        reply = fresh_python(block).reload(out, str(tmp_path / "ids.pt"), str(target), kwargs=kwargs,
                                           auto="AutoModelForImageTextToText",
                                           generate={"prompt": PROMPT, "new": 6})
        expected_class = STOCK_CLASS[wrapper] if kind == "uniform" else "HfSnp" + STOCK_CLASS[wrapper]
        assert reply["class"] == expected_class and reply["hf_snp_loaded"] == (block == "import hf_snp")
        assert torch.allclose(torch.load(target), expected, atol=1e-5)
        assert reply["tokens"] == tokens.tolist()
