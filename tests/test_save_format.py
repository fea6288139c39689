"""Layer shapes (LayerShape) and the choice of save format.

Uniform head pruning that leaves a head count not dividing hidden_size: transformers 5's stock
LlamaConfig refuses it (save_pretrained validates hidden_size % num_attention_heads even with an
explicit head_dim), so such a result is saved as the hf_snp type, which keeps the original counts
in the config and the pruned ones in ``hf_snp_layers``.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, logits, prune_quiet, sites_of, tiny_llama, tiny_vit
from fresh_python import fresh_python
from test_save_reload import BLOCK_HF_SNP, reload_in_fresh_process
from transformers import LlamaConfig, LlamaForCausalLM

from hf_snp.adapters import get_adapter
from hf_snp.deliver.save_format import check_save_format, choose_save_format, config_rejection, config_shapes
from hf_snp.models.modeling_hf_snp import HfSnpLlamaConfig, LayerShape
from hf_snp.units.records import HEAD_FIELDS, MLP_FIELDS, LayerRecord


@pytest.fixture(scope="module", autouse=True)
def _reload_processes_started():
    """Start the session's two reload processes (fresh_python.py) now: their imports of torch and transformers
    run on the other core while this module prunes, instead of in the first test that reloads."""
    for block in (BLOCK_HF_SNP, "import hf_snp"):
        fresh_python(block)

# --- LayerShape: the hf_snp_layers entry; LayerRecord: the report's per-layer record (two LayerShapes)


def test_layer_shape_spec_round_trip_keeps_the_saved_format():
    shape = LayerShape(intermediate_size=40, mlp_output_bias=True, num_attention_heads=3, num_key_value_heads=1)
    assert shape.to_spec() == {"intermediate_size": 40, "mlp_output_bias": True, "num_attention_heads": 3,
                               "num_key_value_heads": 1}  # absent bias not written
    assert LayerShape.from_spec(shape.to_spec()) == shape
    assert LayerShape.from_spec({}) == LayerShape() and LayerShape().to_spec() == {}
    assert LayerShape.from_spec(None) == LayerShape()
    with pytest.raises(ValueError, match="unknown hf_snp_layers keys"):
        LayerShape.from_spec({"intermediate_size": 4, "mlp_width": 4})


def test_layer_record_keys_are_the_report_schema():
    before = LayerShape(intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
    after = LayerShape(intermediate_size=30, mlp_output_bias=True, num_attention_heads=2, num_key_value_heads=2)
    record = LayerRecord(3, before, after, MLP_FIELDS + HEAD_FIELDS, {"mlp": 0.5})
    data = record.to_dict()
    assert list(data) == ["layer", "mlp_width_before", "mlp_width", "mlp_output_bias_added", "num_heads_before",
                          "num_heads", "num_kv_heads_before", "num_kv_heads", "attention_output_bias_added",
                          "mlp_ridge"]
    assert data["layer"] == 3 and data["mlp_width"] == 30 and data["mlp_output_bias_added"] is True
    assert data["num_heads_before"] == 4 and data["mlp_ridge"] == 0.5
    assert LayerRecord.from_dict(data) == record
    assert LayerRecord.from_dict(json.loads(json.dumps(data))) == record  # the checkpoint's and the report's JSON
    assert record.changed and not LayerRecord(0, before, before, HEAD_FIELDS).changed
    assert LayerRecord(0, after=LayerShape(intermediate_size=5), fields=MLP_FIELDS).to_dict() == {
        "layer": 0, "mlp_width_before": None, "mlp_width": 5, "mlp_output_bias_added": False}
    blocks = LayerRecord.from_dict({"layer": 0, "source_layer": 3})  # a block-removal record
    assert blocks.after == blocks.before == LayerShape() and blocks.source_layer == 3 and not blocks.changed
    with pytest.raises(ValueError, match="not an hf_snp layer record"):
        LayerRecord.from_dict({"layer": 0, "mlp_neurons": 4})


def test_layer_record_parts_and_later_cuts():
    mlp = LayerRecord(1, LayerShape(intermediate_size=48), LayerShape(intermediate_size=40), MLP_FIELDS, {"mlp": 1.0})
    heads = LayerRecord(1, LayerShape(num_attention_heads=4, num_key_value_heads=2),
                        LayerShape(num_attention_heads=2, num_key_value_heads=2, attention_output_bias=True),
                        HEAD_FIELDS)
    layer = LayerRecord(1).with_part(heads).with_part(mlp)
    assert layer.fields == HEAD_FIELDS + MLP_FIELDS and layer.ridges == {"mlp": 1.0}
    assert layer.to_dict() == {"layer": 1, **heads.to_dict(), **mlp.to_dict()}  # what dict.update of the parts gave
    later = LayerRecord(0, LayerShape(intermediate_size=40), LayerShape(intermediate_size=32, mlp_output_bias=True),
                        MLP_FIELDS, {"mlp": 2.0})
    cut = layer.after_cut(later)  # a later round of the iterative search: new widths, the widths before stay
    assert cut.before == layer.before and cut.layer == 1 and cut.ridges == {"mlp": 2.0}
    assert cut.after == LayerShape(intermediate_size=32, mlp_output_bias=True, num_attention_heads=2,
                                   num_key_value_heads=2, attention_output_bias=True)


def test_layer_shape_update_replaces_widths_and_accumulates_biases():
    old = LayerShape(intermediate_size=40, mlp_output_bias=True, num_attention_heads=4, num_key_value_heads=2)
    new = old.updated(LayerShape(num_attention_heads=2, num_key_value_heads=2, attention_output_bias=True))
    assert new == LayerShape(intermediate_size=40, mlp_output_bias=True, num_attention_heads=2, num_key_value_heads=2,
                             attention_output_bias=True)


def test_site_describe_and_reshape_like_use_the_record_keys():
    model = tiny_llama()
    heads, mlp = sites_of(model, "heads")[0], sites_of(model, "mlp")[0]
    assert heads.describe().to_dict() == {"layer": 0, "num_heads_before": 4, "num_heads": 4, "num_kv_heads_before": 2,
                                          "num_kv_heads": 2, "attention_output_bias_added": False}
    assert mlp.describe().to_dict() == {"layer": 0, "mlp_width_before": 48, "mlp_width": 48,
                                        "mlp_output_bias_added": False}
    heads.reshape_like(LayerRecord.from_dict({"layer": 0, "num_heads": 2, "num_kv_heads": 2,
                                              "attention_output_bias_added": True}))
    mlp.reshape_like(LayerRecord.from_dict({"layer": 0, "mlp_width": 30, "mlp_output_bias_added": False}))
    assert heads.describe().after.num_attention_heads == 2 and heads.consumer_linear.bias is not None
    mlp.ridge = 0.25
    assert mlp.describe().to_dict() == {"layer": 0, "mlp_width_before": 48, "mlp_width": 30,
                                        "mlp_output_bias_added": False, "mlp_ridge": 0.25}


@pytest.mark.parametrize("target, mode", [("mlp", "per_group"), ("heads", "per_group"), ("heads", "kv_groups"),
                                          ("heads", "mha")])
def test_shape_after_predicts_the_shape_pruning_leaves(target, mode):
    def fresh_site():
        model = llama_with_heads(32, 4, 4, 8) if mode == "mha" else tiny_llama()
        return sites_of(model, target, "per_group" if mode == "mha" else mode)[0]

    for steps in range(fresh_site().max_steps() + 1):
        site = fresh_site()
        predicted = site.shape_after(steps)
        site.apply(site._placeholder_decision(steps, False))
        assert site.shape() == predicted, steps


# --- Head counts that do not divide hidden_size


def llama_with_heads(hidden: int, heads: int, kv_heads: int, head_dim: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def test_the_stock_llama_config_refuses_heads_that_do_not_divide_hidden_size():
    config = llama_with_heads(40, 5, 5, 8).config
    assert config_rejection(LlamaConfig, config) is None
    config.num_attention_heads = config.num_key_value_heads = 3
    assert "not a multiple of the number of attention heads" in config_rejection(LlamaConfig, config)


# hidden 40, 5 heads of 8 (multi-head) -> 3 heads; hidden 32, 8 heads of 4 in 2 KV groups (Llama-3.2-like)
# -> 6 heads (one query head per group removed): neither divides hidden_size
@pytest.mark.parametrize("hidden, heads, kv_heads, head_dim, sparsity, pruned", [
    (40, 5, 5, 8, 0.4, (3, 3)),
    (32, 8, 2, 4, 0.2, (6, 2)),
])
def test_uniform_heads_not_dividing_hidden_size_save_as_the_hf_snp_type(tmp_path, hidden, heads, kv_heads, head_dim,
                                                                         sparsity, pruned):
    model = llama_with_heads(hidden, heads, kv_heads, head_dim)
    adapter = get_adapter(model.config)
    expected_shapes = [LayerShape(num_attention_heads=pruned[0], num_key_value_heads=pruned[1])] * 3
    assert check_save_format(adapter, model.config, expected_shapes) == "hf_snp"  # known before any pruning
    assert check_save_format(adapter, model.config) == "hf_snp"  # the preflight without predicted shapes

    out = tmp_path / "out"
    result = prune_quiet(model, targets=("heads",), sparsity=sparsity, allocation="uniform", output_dir=str(out))
    assert [(r["num_heads"], r["num_kv_heads"]) for r in result.report["layers"]] == [pruned] * 3
    assert result.report["save_format"] == "hf_snp"
    config = json.load(open(out / "config.json"))
    assert config["model_type"] == "hf_snp_llama"
    counts = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    assert counts == (heads, kv_heads, head_dim)  # the stock fields keep the original counts
    assert config["hf_snp_layers"] == [{"num_attention_heads": pruned[0], "num_key_value_heads": pruned[1]}] * 3
    expected = logits(result.model)
    got, class_name = reload_in_fresh_process(tmp_path, out, "trust_remote_code=True", BLOCK_HF_SNP)
    assert class_name == "HfSnpLlamaForCausalLM"
    assert torch.allclose(got, expected, atol=1e-5)
    got, _ = reload_in_fresh_process(tmp_path, out, "", "import hf_snp")
    assert torch.allclose(got, expected, atol=1e-5)


def test_uniform_heads_dividing_hidden_size_stay_stock():
    model = llama_with_heads(40, 5, 5, 8)
    adapter = get_adapter(model.config)
    shapes = [LayerShape(intermediate_size=30, num_attention_heads=4, num_key_value_heads=4)] * 3  # 40 % 4 == 0
    assert choose_save_format(adapter, model.config, shapes) == "stock"
    assert check_save_format(adapter, model.config, shapes) == "stock"
    assert model.config.num_attention_heads == 5 and model.config.intermediate_size == 48  # checks change nothing
    assert config_shapes(model.config, 3) == [LayerShape()] * 3


def test_the_hf_snp_config_accepts_pruned_counts_that_the_stock_one_refuses():
    config = HfSnpLlamaConfig(**llama_with_heads(40, 5, 5, 8).config.to_dict())
    config.hf_snp_layers = [LayerShape(num_attention_heads=3, num_key_value_heads=3).to_spec()] * 3
    assert config_rejection(HfSnpLlamaConfig, config) is None


def test_vit_heads_not_dividing_hidden_size_stay_stock(tmp_path):
    """ViT's stock config (transformers 5) does not check hidden_size % heads: 4 -> 3 heads of 8 in hidden 32
    stays stock."""
    model = tiny_vit()
    assert check_save_format(get_adapter(model.config), model.config,
                             [LayerShape(num_attention_heads=3, num_key_value_heads=3)] * 3) == "stock"
    pixels = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = tmp_path / "out"
    result = prune_quiet(model, calibration=pixels, targets=("heads",), sparsity=0.25, output_dir=str(out))
    assert [r["num_heads"] for r in result.report["layers"]] == [3] * 3
    assert result.report["save_format"] == "stock"
    config = json.load(open(out / "config.json"))
    assert (config["model_type"], config["num_attention_heads"], config["head_dim"]) == ("vit", 3, 8)
    test_pixels, out_file = str(tmp_path / "pixels.pt"), str(tmp_path / "logits.pt")
    torch.save(pixels[:4], test_pixels)
    # AutoModelForImageClassification.from_pretrained in the session's child process without hf_snp
    reply = fresh_python(BLOCK_HF_SNP).reload(out, test_pixels, out_file, auto="AutoModelForImageClassification",
                                              input_name="pixel_values")
    assert reply["class"] == "ViTForImageClassification" and not reply["hf_snp_loaded"]
    with torch.no_grad():
        assert torch.allclose(torch.load(out_file), result.model(pixel_values=pixels[:4]).logits, atol=1e-5)
