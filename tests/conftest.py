"""Tiny models built from configs, and helpers that build exact redundancy into them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

import hf_snp
from hf_snp.adapters import get_adapter

VOCAB = 96


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """4 layers, hidden 32, MLP 48, 4 query heads sharing 2 KV heads (GQA)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def tiny_opt(seed: int = 0, **overrides) -> OPTForCausalLM:
    """4 layers, hidden 32, MLP 48, 4 heads, biases everywhere.

    fc1 biases sit around +1 so that every ReLU fires on some calibration tokens: a neuron
    that never fires there has zero variance and is (rightly) removed, which would make
    exactness tests depend on calibration coverage rather than on the maths.
    """
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=4, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64, init_std=0.2, **overrides,
    )
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():  # OPT initialises biases to zero; give them real values
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(1.0 if name.endswith("fc1.bias") else 0.0, 0.2)
    return model


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           initializer_range=0.2, sliding_window=8)
    return MistralForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2: q/k/v biases, GQA."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2)
    return Qwen2ForCausalLM(config).eval()


TINY = {"llama": tiny_llama, "opt": tiny_opt, "mistral": tiny_mistral, "qwen2": tiny_qwen2}

IMAGE = 16  # tiny vision models: 16x16 RGB inputs, patch 4 -> 16 patch tokens


def _vision_config(config_cls, **overrides):
    return config_cls(image_size=IMAGE, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=3,
                      num_attention_heads=4, intermediate_size=48, num_labels=7, initializer_range=0.2, **overrides)


@torch.no_grad()
def _vision_biases(model):
    """Stock init zeroes biases and the CLS/distillation tokens; give them values so every token differs."""
    for name, param in model.named_parameters():
        if name.endswith("bias") or "token" in name or "position" in name:
            param.normal_(0.0, 0.2)
    return model.eval()


def tiny_vit(seed: int = 0, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return _vision_biases(ViTForImageClassification(_vision_config(ViTConfig, **overrides)))


def tiny_deit(seed: int = 0, **overrides) -> DeiTForImageClassification:
    torch.manual_seed(seed)
    return _vision_biases(DeiTForImageClassification(_vision_config(DeiTConfig, **overrides)))


def tiny_deit_teacher(seed: int = 0, **overrides) -> DeiTForImageClassificationWithTeacher:
    torch.manual_seed(seed)
    return _vision_biases(DeiTForImageClassificationWithTeacher(_vision_config(DeiTConfig, **overrides)))


TINY_VISION = {"vit": tiny_vit, "deit": tiny_deit, "deit-teacher": tiny_deit_teacher}


def pixel_values(num: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(num, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def image_logits(model, pixels=None) -> torch.Tensor:
    return model(pixel_values=pixel_values(4, seed=7) if pixels is None else pixels).logits


def calibration_ids(num: int = 16, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (num, length), generator=torch.Generator().manual_seed(seed))


def eval_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 20), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model, ids=None) -> torch.Tensor:
    return model(eval_ids() if ids is None else ids).logits


def sites_of(model, target: str, gqa_mode: str = "per_group"):
    adapter = get_adapter(model.config)
    return [adapter.sites(layer, i, (target,), model.config, gqa_mode)[0]
            for i, layer in enumerate(adapter.layers(model))]


def mlp_sites(model):
    return sites_of(model, "mlp")


@torch.no_grad()
def make_scaled_copies(model, copies: int, layers=None) -> None:
    """In each chosen layer, the last ``copies`` MLP neurons become positive multiples of the first ones.

    Llama: same gate row, up row times c  -> h_j = c h_i.  OPT (ReLU): fc1 row and bias times c > 0.
    """
    for site in mlp_sites(model):
        if layers is not None and site.index not in layers:
            continue
        n = site.num_units
        for k in range(copies):
            src, dst, scale = k, n - copies + k, 0.5 + 0.25 * k
            producers = site.producer_linears
            if len(producers) == 2:  # gated: gate copied, up scaled
                producers[0].weight[dst] = producers[0].weight[src]
                producers[1].weight[dst] = scale * producers[1].weight[src]
            else:
                producers[0].weight[dst] = scale * producers[0].weight[src]
                producers[0].bias[dst] = scale * producers[0].bias[src]


@torch.no_grad()
def make_constant_neurons(model, count: int) -> None:
    """The last ``count`` MLP neurons of each layer ignore their input: constant nonzero outputs."""
    for site in mlp_sites(model):
        for producer in site.producer_linears:
            producer.weight[-count:] = 0
            producer.bias[-count:] = torch.linspace(0.5, 1.5, count)


def sparsity_removing(model, units: int) -> float:
    """The sparsity whose uniform allocation removes exactly ``units`` MLP neurons per layer."""
    site = mlp_sites(model)[0]
    return units * site.params_per_step() / site.num_params()


def run_python(code: str, env_extra: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter; returns stdout (raises with stderr on failure)."""
    env = {**os.environ, **(env_extra or {})}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{done.stderr[-4000:]}")
    return done.stdout


@pytest.fixture
def no_long_work(monkeypatch):
    """Loading weights or starting the engine counts as long work: fail loudly if reached."""
    def forbidden(*args, **kwargs):
        raise AssertionError("long work started before the bad input was reported")

    import hf_snp.api
    import hf_snp.passes.engine

    monkeypatch.setattr(hf_snp.api, "load_model", forbidden)
    monkeypatch.setattr(hf_snp.passes.engine.StreamingEngine, "run", forbidden)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


THREADS = torch.get_num_threads()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """One torch thread for the tiny models, set before any of the test's fixtures: on a busy 2-core machine two
    intra-op threads mostly wait on each other (test_heads.py ran 5x slower and burnt 2.5x the CPU time). The
    slow tests on SmolLM2 keep every thread."""
    torch.set_num_threads(THREADS if item.get_closest_marker("slow") else 1)


def prune_quiet(model, **kwargs):
    kwargs.setdefault("calibration", calibration_ids())
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("progress", False)
    return hf_snp.prune(model, **kwargs)


# Llama-like families beyond Llama/Mistral/Qwen2 (issue 14): hidden 32, MLP 48, 4 query heads on 2 KV heads.
# Gemma-style families get an explicit head_dim (16) that is not hidden_size // heads; every norm weight gets
# noise so that the q/k norms and the norms around the attention and MLP outputs matter.

def _llama_like(config_cls, model_cls, seed: int, layers: int, **fields):
    torch.manual_seed(seed)
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **fields)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def tiny_qwen3(seed: int = 0, layers: int = 4):
    """Qwen3: per-head q/k RMSNorm, explicit head_dim, sliding windows in the upper layers."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _llama_like(Qwen3Config, Qwen3ForCausalLM, seed, layers, head_dim=8, use_sliding_window=True,
                       sliding_window=8, max_window_layers=layers // 2)


def tiny_gemma(seed: int = 0, layers: int = 4):
    """Gemma: head_dim 16 (> hidden / heads), scaled embeddings, (1 + w) RMSNorm, tied embeddings."""
    from transformers import GemmaConfig, GemmaForCausalLM

    return _llama_like(GemmaConfig, GemmaForCausalLM, seed, layers, head_dim=16)


def tiny_gemma2(seed: int = 0, layers: int = 4):
    """Gemma 2: norms after attention and MLP, attention and final logit soft-capping, alternating sliding
    windows, query_pre_attn_scalar."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _llama_like(Gemma2Config, Gemma2ForCausalLM, seed, layers, head_dim=16, query_pre_attn_scalar=16,
                       sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)


def tiny_gemma3_text(seed: int = 0, layers: int = 4):
    """Gemma 3 (text): Gemma 2's norms plus per-head q/k norms, local/global rotary bases per layer type."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    types = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    return _llama_like(Gemma3TextConfig, Gemma3ForCausalLM, seed, layers, head_dim=16, query_pre_attn_scalar=16,
                       sliding_window=8, layer_types=types, final_logit_softcapping=3.0)


def tiny_olmo2(seed: int = 0, layers: int = 4):
    """OLMo 2: norms after attention and MLP, q/k norms over the whole projection (cut with the heads)."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return _llama_like(Olmo2Config, Olmo2ForCausalLM, seed, layers)


def tiny_granite(seed: int = 0, layers: int = 4):
    """Granite: embedding, attention, residual multipliers and logit scaling."""
    from transformers import GraniteConfig, GraniteForCausalLM

    return _llama_like(GraniteConfig, GraniteForCausalLM, seed, layers, embedding_multiplier=2.0,
                       attention_multiplier=0.25, residual_multiplier=0.5, logits_scaling=2.0)


def tiny_smollm3(seed: int = 0, layers: int = 4):
    """SmolLM3: every second layer without rotary embeddings."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    return _llama_like(SmolLM3Config, SmolLM3ForCausalLM, seed, layers, no_rope_layer_interval=2)


TINY_LLAMA_LIKE = {"qwen3": tiny_qwen3, "gemma": tiny_gemma, "gemma2": tiny_gemma2, "gemma3_text": tiny_gemma3_text,
                   "olmo2": tiny_olmo2, "granite": tiny_granite, "smollm3": tiny_smollm3}
TINY.update(TINY_LLAMA_LIKE)
