"""A model the user loaded from a GGUF file (``from_pretrained(dir, gguf_file=...)``) prunes and saves.

transformers dequantises the GGUF weights on load (on CPU) but leaves its GGUF quantizer on the
model, and ``save_pretrained`` then refuses it ("The model is quantized with gguf and is not
serializable"). ``hf_snp.setup.loading.prepare_loaded_model`` drops that state before any work.
The fast tests write a tiny Llama GGUF file with the ``gguf`` package; the slow one loads SmolLM2.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import VOCAB, logits, prune_quiet
from torch import nn
from transformers import AutoModelForCausalLM

import hf_snp
from hf_snp.setup.loading import packed_gguf_modules, prepare_loaded_model

gguf = pytest.importorskip("gguf")

HIDDEN, HEADS, KV_HEADS, MLP, LAYERS = 32, 4, 2, 64, 2  # Q8_0 packs rows in blocks of 32


def write_tiny_llama_gguf(path: str) -> None:
    """A 2-layer Llama GGUF with random weights: the MLP and attention matrices in Q8_0, the rest in F32."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([1] * VOCAB)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int, quantize: bool = False) -> None:
        data = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if name.endswith("norm.weight"):
            data += 1.0
        if quantize:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data)

    head_dim = HIDDEN // HEADS
    tensor("token_embd.weight", VOCAB, HIDDEN)
    tensor("output_norm.weight", HIDDEN)
    tensor("output.weight", VOCAB, HIDDEN)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", HIDDEN)
        tensor(f"blk.{i}.ffn_norm.weight", HIDDEN)
        tensor(f"blk.{i}.attn_q.weight", HEADS * head_dim, HIDDEN, quantize=True)
        tensor(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN, quantize=True)
        tensor(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN, quantize=True)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * head_dim, quantize=True)
        tensor(f"blk.{i}.ffn_gate.weight", MLP, HIDDEN, quantize=True)
        tensor(f"blk.{i}.ffn_up.weight", MLP, HIDDEN, quantize=True)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, MLP, quantize=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("gguf")
    write_tiny_llama_gguf(str(directory / "tiny.gguf"))
    return str(directory)


def load_gguf(directory: str):
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file="tiny.gguf", dtype=torch.float32).eval()


def test_a_gguf_loaded_model_carries_the_quantizer_that_blocks_saving(gguf_dir, tmp_path):
    model = load_gguf(gguf_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.intermediate_size == MLP
    assert model.hf_quantizer is not None and model.config.quantization_config is not None
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "raw")  # the bug hf_snp has to get around


def test_prepare_loaded_model_strips_the_gguf_state(gguf_dir, tmp_path):
    model = load_gguf(gguf_dir)
    expected = logits(model)
    assert prepare_loaded_model(model) is model
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    assert not getattr(model, "is_quantized", False)
    model.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    assert torch.allclose(logits(reloaded), expected, atol=1e-6)
    assert prepare_loaded_model(model) is model  # idempotent; an ordinary model is left alone


def test_a_gguf_loaded_model_prunes_saves_and_reloads(gguf_dir, tmp_path):
    model = load_gguf(gguf_dir)
    out = tmp_path / "out"
    result = prune_quiet(model, method="snp", sparsity=0.3, targets=("mlp", "heads"), output_dir=str(out))
    assert result.report["save_format"] == "stock"
    assert os.path.exists(out / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.config.intermediate_size < MLP and getattr(reloaded.config, "quantization_config", None) is None
    assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-5)


def test_packed_gguf_weights_are_refused_before_any_work(gguf_dir, tmp_path, no_long_work):
    """Where transformers keeps GGUF blocks packed (its GGUF kernels), there are no dense weights to prune."""
    model = load_gguf(gguf_dir)

    class GgufLinear(nn.Linear):  # stands in for transformers.integrations.gguf.utils.GgufLinear
        pass

    GgufLinear.__module__ = "transformers.integrations.gguf.utils"
    model.model.layers[0].mlp.down_proj = GgufLinear(MLP, HIDDEN, bias=False)
    assert packed_gguf_modules(model) == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="dequantize=True"):
        prune_quiet(model, sparsity=0.3, output_dir=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_user_loaded_smollm2_gguf_prunes_and_saves(tmp_path):
    from hf_snp.setup.loading import demo_model_source

    try:
        source = demo_model_source()
    except ModuleNotFoundError as error:
        pytest.fail(f"the SmolLM2 tests need the demo extra: {error}")
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32).eval()
    tokenizer = hf_snp.setup.loading.load_tokenizer(source)
    out = tmp_path / "out"
    result = hf_snp.prune(model, tokenizer, method="snp", sparsity=0.3, calibration="wikitext2-local", num_samples=2,
                          seq_len=64, output_dir=str(out), progress=False)
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.config.intermediate_size < 1536
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-4)
