"""SNP's decisions on tiny models of each post-norm family, built with the statistics that matter.

    python benchmarks/defaults_tiny.py [--seeds 3]

Random models (hidden 64, MLP 256, 8 heads on 4 KV heads of 16 dims, 4 layers, vocabulary 256) of Llama (no
post-norm: the control), Gemma 2, Gemma 3 and OLMo 2, with every norm's weight log-normal (exp(1.5 N(0, 1)): gains
over decades, as trained post-norms have; Gemma's 1 + w is set to it) and heavy-tailed activations (each embedding
dimension scaled by exp(N(0, 1)), a few dimensions carrying most of the energy). 30% and 50% of MLP neurons,
uniform allocation, 32 x 64 random calibration tokens; the error is measured on 16 x 64 other tokens against the
dense model: KL(dense || pruned) of the next-token distributions, mean per token, averaged over the seeds.

Candidates: the paper's SNP (ZCA order, fixed ridge), VBP, FLAP, SNP's OBS order with the held-out ridge measured
before the norm (``post_norm_weights=False``) and after it (§3.11), and ``ordering='heldout'`` (§3.12), whose
choices are counted. Writes benchmarks/results/defaults_tiny.md.
"""

from __future__ import annotations

import argparse
import collections
import copy
import os

import torch
from measure import code_commit
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
)

import hf_snp

RESULTS = os.path.join(os.path.dirname(__file__), "results")
VOCAB = 256
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16)),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, dict(head_dim=16, query_pre_attn_scalar=16,
                                                               sliding_window=16)),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {}),
}
CANDIDATES = {
    "paper SNP": dict(method="snp", ordering="zca", ridge="fixed"),
    "VBP": dict(method="vbp"),
    "FLAP": dict(method="flap"),
    "OBS, before the norm": dict(method="snp", ordering="obs", post_norm_weights=False),
    "OBS, after the norm": dict(method="snp", ordering="obs"),
    "heldout choice": dict(method="snp", ordering="heldout"),
}


def tiny(family: str, seed: int):
    config_cls, model_cls, fields = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                        initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2, **fields)
    model = model_cls(config).eval()
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                gain = torch.exp(1.5 * torch.randn_like(param))
                param.copy_(gain - 1 if gemma else gain)
        embed = model.get_input_embeddings().weight
        embed.mul_(torch.exp(torch.randn(embed.shape[1])))
    return model


@torch.no_grad()
def kl(dense_logits: torch.Tensor, model, ids: torch.Tensor) -> float:
    ref, got = dense_logits.double().log_softmax(-1), model(ids).logits.double().log_softmax(-1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    rows, choices = [], collections.Counter()
    for family in FAMILIES:
        for sparsity in (0.3, 0.5):
            totals = dict.fromkeys(CANDIDATES, 0.0)
            for seed in range(args.seeds):
                model = tiny(family, seed)
                g = torch.Generator().manual_seed(1000 + seed)
                calib = torch.randint(3, VOCAB, (32, 64), generator=g)
                ids = torch.randint(3, VOCAB, (16, 64), generator=g)
                dense_logits = model(ids).logits
                for name, options in CANDIDATES.items():
                    result = hf_snp.prune(copy.deepcopy(model), calibration=calib, sparsity=sparsity, targets=("mlp",),
                                          batch_size=8, progress=False, **options)
                    totals[name] += kl(dense_logits, result.model, ids) / args.seeds
                    if options.get("ordering") == "heldout":
                        choices.update(layer["mlp_decision"] for layer in result.report["layers"])
            best = min(totals.values())
            rows.append(f"| {family} | {sparsity:.0%} | " + " | ".join(
                f"**{v:.4f}**" if v == best else f"{v:.4f}" for v in totals.values()) + " |")
            print(rows[-1], flush=True)
    lines = ["# Tiny models of the post-norm families: KL to the dense model after pruning MLP neurons", "",
             f"hf_snp at commit {code_commit()}. Regenerate: `python benchmarks/defaults_tiny.py --seeds {args.seeds}` "
             "(a few minutes on 2 cores). Models, statistics and candidates in the script's docstring; mean "
             f"KL(dense || pruned) per token over {args.seeds} seeds, lower is better, the least in bold.", "",
             "| family | MLP removed | " + " | ".join(CANDIDATES) + " |",
             "| --- | ---: |" + " ---: |" * len(CANDIDATES), *rows, "",
             "The per-site choice's decisions over all its sites: "
             + ", ".join(f"{name} {count}" for name, count in sorted(choices.items())) + ".", ""]
    with open(os.path.join(RESULTS, "defaults_tiny.md"), "w") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    main()
