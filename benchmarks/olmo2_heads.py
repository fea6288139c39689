"""OLMo 2 heads (issue 28 item 4): does the fitted q/k norm factor (docs/design.md §5.5) help, and against what?

    python benchmarks/olmo2_heads.py [--seeds 10]

Tiny random OLMo 2 models (transformers ``Olmo2Config``: hidden 64, 8 query heads of 8 dims, MLP 128, 4 layers,
vocabulary 256), built here with noisy norm weights and, in the "spread" settings, each head's q/k rows scaled by
exp(s N(0, 1)), s = 0.7 or 1.4 (heads of unequal size, as trained ones are: removing some moves each token's
RMS). SNP prunes ``targets=("heads",)`` at 25% and 50% of the attention parameters, uniform allocation, on 32 x 64
random tokens; the error is measured on 16 x 64 other tokens against the dense model:

* "cut": the norms' weights cut to the kept heads, nothing else (``qk_norm_correction=False``);
* "fitted": cut and multiplied by the least-squares factor (the default);
* "per-token": the cut model with every q/k norm dividing by the dense model's own RMS of the full projection on the
  same input (an oracle no stored weight can express: the floor of what a scalar could reach);
* "MLP instead": heads left alone (the old refusal) and the same number of parameters taken from the MLP.

Columns: KL(dense || pruned) of the next-token distributions, mean over tokens, and the relative logits error
‖L − L_dense‖² / ‖L_dense − mean‖². Means over the seeds (10 by default). Writes benchmarks/results/olmo2_heads.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from measure import code_commit
from torch import nn
from transformers import Olmo2Config, Olmo2ForCausalLM

import hf_snp
from hf_snp.adapters import get_adapter

RESULTS = os.path.join(os.path.dirname(__file__), "results")
VOCAB, HIDDEN, HEADS, D, LAYERS = 256, 64, 8, 8, 4
SETTINGS = {"stock init": 0.0, "spread": 0.7, "wide spread": 1.4}
# 25% is one step in each: one head of 8, one query head from each of 2 KV groups, one of 4 KV groups
MODES = {"MHA": (8, None), "GQA per_group (8 on 2)": (2, "per_group"), "GQA kv_groups (8 on 4)": (4, "kv_groups")}
SPARSITIES = (0.25, 0.5)
VARIANTS = ("cut", "fitted", "per-token", "MLP instead")


def tiny_olmo2(kv_heads: int, spread: float, seed: int) -> Olmo2ForCausalLM:
    torch.manual_seed(seed)
    config = Olmo2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Olmo2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                scale = torch.exp(spread * torch.randn(proj.out_features // D)).repeat_interleave(D)
                proj.weight.mul_(scale[:, None])
    return model


class DenseRmsNorm(nn.Module):
    """The cut norm's kept weights over the kept entries, divided by the dense projection's RMS of all its rows on the
    attention's input (stashed by a pre-hook): the per-token oracle."""

    def __init__(self, weight: torch.Tensor, dense_proj: nn.Linear, dense_eps: float, stash: dict):
        super().__init__()
        self.weight, self.dense_proj, self.eps, self.stash = weight, dense_proj, dense_eps, stash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.dense_proj(self.stash["hidden"]).float()
        return self.weight * x.float() * torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + self.eps)


def kept_heads(dense: nn.Linear, cut: nn.Linear) -> list[int]:
    """The dense head each of the cut projection's heads is (rows are kept unchanged)."""
    return [next(h for h in range(dense.out_features // D)
                 if torch.equal(cut.weight[j * D:(j + 1) * D], dense.weight[h * D:(h + 1) * D]))
            for j in range(cut.out_features // D)]


@torch.no_grad()
def per_token_oracle(dense: Olmo2ForCausalLM, cut: Olmo2ForCausalLM) -> Olmo2ForCausalLM:
    """``cut`` with every q/k norm replaced by a ``DenseRmsNorm`` (cut weights, dense RMS)."""
    oracle = copy.deepcopy(cut)
    for dense_layer, layer in zip(dense.model.layers, oracle.model.layers):
        attention, stash = layer.self_attn, {}
        attention.register_forward_pre_hook(lambda module, args, kwargs, stash=stash: stash.update(
            hidden=kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
        for proj, norm in (("q_proj", "q_norm"), ("k_proj", "k_norm")):
            dense_proj = getattr(dense_layer.self_attn, proj)
            eps = getattr(dense_layer.self_attn, norm).variance_epsilon
            setattr(attention, norm, DenseRmsNorm(getattr(attention, norm).weight, dense_proj, eps, stash))
    return oracle


@torch.no_grad()
def errors(dense_logits: torch.Tensor, model: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """(mean KL(dense || model) per token, relative logits error)."""
    got = model(ids).logits.double()
    ref = dense_logits.double()
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - got.log_softmax(-1))).sum(-1).mean().item()
    relative = ((got - ref).square().sum() / (ref - ref.mean()).square().sum()).item()
    return kl, relative


def prune(model, correction: bool, **options):
    adapter = get_adapter(model.config)
    adapter.qk_norm_correction = correction
    try:
        return hf_snp.prune(copy.deepcopy(model), progress=False, batch_size=8, allocation="uniform", **options)
    finally:
        adapter.qk_norm_correction = True


@torch.no_grad()
def attention_view(dense: Olmo2ForCausalLM, fitted: Olmo2ForCausalLM, ids: torch.Tensor) -> dict[str, list[float]]:
    """Per layer and projection (q, k where heads left it), on the dense model's own inputs of the evaluation tokens:
    "cv", the coefficient of variation over tokens of RMS_kept/RMS_all (the per-token factor a scalar stands in for),
    and the relative error of the normalised kept entries against the dense ones, cut alone ("cut") and with the
    fitted factor ("fitted"): sum ||pruned - dense||^2 / sum ||dense||^2."""
    outputs, handles = {}, []
    for index, layer in enumerate(dense.model.layers):
        for proj in ("q", "k"):
            handles.append(getattr(layer.self_attn, f"{proj}_proj").register_forward_hook(
                lambda module, args, out, key=(index, proj): outputs.__setitem__(key, out.double())))
    dense(ids)
    for handle in handles:
        handle.remove()
    view = {"cv": [], "cut": [], "fitted": []}
    for (index, proj), x in outputs.items():
        full_attention, attention = dense.model.layers[index].self_attn, fitted.model.layers[index].self_attn
        full, cut = getattr(full_attention, f"{proj}_proj"), getattr(attention, f"{proj}_proj")
        if cut.out_features == full.out_features:
            continue
        rows = torch.cat([torch.arange(h * D, (h + 1) * D) for h in kept_heads(full, cut)])
        norm = getattr(full_attention, f"{proj}_norm")
        weight, eps = norm.weight.double(), norm.variance_epsilon
        target = (weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))[..., rows]
        kept = x[..., rows]
        alone = weight[rows] * kept * torch.rsqrt(kept.pow(2).mean(-1, keepdim=True) + eps)
        factor = (getattr(attention, f"{proj}_norm").weight.double() / weight[rows]).mean()
        ratio = kept.pow(2).mean(-1).sqrt() / x.pow(2).mean(-1).sqrt()
        view["cv"].append((ratio.std() / ratio.mean()).item())
        for name, scale in (("cut", 1.0), ("fitted", factor)):
            view[name].append(((scale * alone - target).square().sum() / target.square().sum()).item())
    return view


def run_case(kv_heads: int, mode: str | None, spread: float, sparsity: float, seed: int,
             calib: torch.Tensor, ids: torch.Tensor) -> dict:
    dense = tiny_olmo2(kv_heads, spread, seed)
    dense_logits = dense(ids).logits
    options = {"calibration": calib, "targets": ("heads",), "sparsity": sparsity}
    if mode:
        options["gqa_mode"] = mode
    cut, fitted = prune(dense, False, **options), prune(dense, True, **options)
    removed = fitted.report["params_removed"]
    mlp_params = sum(3 * HIDDEN * 2 * HIDDEN for _ in range(LAYERS))
    mlp = prune(dense, True, calibration=calib, targets=("mlp",), sparsity=removed / mlp_params)
    models = {"cut": cut.model, "fitted": fitted.model, "per-token": per_token_oracle(dense, cut.model),
              "MLP instead": mlp.model}
    row = {name: errors(dense_logits, model, ids) for name, model in models.items()}
    scales = [layer.self_attn.q_norm.weight / dense_layer.self_attn.q_norm.weight[torch.cat(
        [torch.arange(h * D, (h + 1) * D) for h in kept_heads(dense_layer.self_attn.q_proj, layer.self_attn.q_proj)])]
        for dense_layer, layer in zip(dense.model.layers, fitted.model.model.layers)]
    row["q factors"] = [s.mean().item() for s in scales]
    row["view"] = attention_view(dense, fitted.model, ids)
    row["removed"] = (removed, mlp.report["params_removed"])
    return row


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def table(results: dict, index: int, label: str) -> list[str]:
    lines = [f"| setting | mode | heads removed | {' | '.join(VARIANTS)} |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in VARIANTS) + " |"]
    for (setting, mode, sparsity), rows in results.items():
        values = {v: mean(r[v][index] for r in rows) for v in VARIANTS}
        best = min(values[v] for v in ("cut", "fitted"))
        cells = [f"**{values[v]:.4f}**" if v in ("cut", "fitted") and values[v] == best else f"{values[v]:.4f}"
                 for v in VARIANTS]
        lines.append(f"| {setting} | {mode} | {sparsity:.0%} | {' | '.join(cells)} |")
    return [f"{label}:", "", *lines, ""]


def write(results: dict, seeds: int, seconds: float) -> str:
    factors = {key: (min(f for r in rows for f in r["q factors"]), max(f for r in rows for f in r["q factors"]),
                     *(mean(c for r in rows for c in r["view"][name]) for name in ("cv", "cut", "fitted")))
               for key, rows in results.items()}
    wins = {name: sum(mean(r[name][0] for r in rows) < mean(r["cut"][0] for r in rows) for rows in results.values())
            for name in ("fitted", "per-token")}
    lines = ["# OLMo 2 heads: the q/k norm factor (docs/design.md §5.5)", "",
             f"Tiny random OLMo 2 (hidden {HIDDEN}, {HEADS} heads x {D} dims, MLP {2 * HIDDEN}, {LAYERS} layers, "
             f"vocabulary {VOCAB}); SNP, `targets=('heads',)`, uniform allocation; calibration 32 x 64 random tokens, "
             f"evaluation 16 x 64 others; means over {seeds} seeds. \"stock init\": transformers' initialisation "
             "(norm weights with noise); \"spread\" / \"wide spread\": each head's q/k rows also scaled by "
             "exp(s N(0, 1)), s = 0.7 / 1.4, so heads differ in size and removing some moves each token's RMS.", "",
             "Variants: \"cut\", the kept heads' entries of q_norm/k_norm only; \"fitted\", cut and multiplied by "
             "the least-squares factor (the default); \"per-token\", the cut model with each q/k norm dividing by "
             "the dense projection's own RMS on the same input, the dense model's own normalisation, which "
             "no stored weight can express; \"MLP instead\", heads left alone (the former refusal) and the same number "
             "of parameters taken from the MLP.", "",
             f"Regenerate: `python benchmarks/olmo2_heads.py --seeds {seeds}` ({seconds:.0f} s CPU on this machine, "
             f"hf_snp at commit {code_commit()}).", "",
             *table(results, 0, "KL(dense || pruned), mean per token (bold: the better of cut and fitted)"),
             *table(results, 1, "Relative logits error ||L - L_dense||^2 / ||L_dense - mean||^2"),
             "Inside the attention, on the dense model's own inputs of the evaluation tokens (no error from earlier "
             "layers): the fitted query factors (min..max over layers and seeds); the per-token spread a factor "
             "stands in for (coefficient of variation over tokens of RMS_kept/RMS_all); the relative error of the "
             "kept heads' normalised queries and keys against the dense ones, sum ||pruned - dense||^2 / "
             "sum ||dense||^2, cut alone and with the fitted factor (means over layers, q and k, seeds):", "",
             "| setting | mode | heads removed | q factor | per-token CV | q/k error, cut | q/k error, fitted |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for (setting, mode, sparsity), (low, high, cv, cut, fitted) in factors.items():
        lines.append(f"| {setting} | {mode} | {sparsity:.0%} | {low:.3f}..{high:.3f} | {cv:.3f} | {cut:.4f} | "
                     f"{fitted:.4f} |")
    lines += ["", f"Lower mean KL than cut alone: the fitted factor in {wins['fitted']} of {len(results)} rows, the "
              f"per-token oracle in {wins['per-token']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.process_time()
    generator = torch.Generator().manual_seed(123)
    calib = torch.randint(3, VOCAB, (32, 64), generator=generator)
    ids = torch.randint(3, VOCAB, (16, 64), generator=generator)
    results = {}
    for setting, spread in SETTINGS.items():
        for mode_name, (kv_heads, mode) in MODES.items():
            for sparsity in SPARSITIES:
                results[setting, mode_name, sparsity] = [run_case(kv_heads, mode, spread, sparsity, seed, calib, ids)
                                                         for seed in range(args.seeds)]
                print(setting, mode_name, sparsity, {v: results[setting, mode_name, sparsity][-1][v] for v in VARIANTS},
                      flush=True)
    text = write(results, args.seeds, time.process_time() - start)
    with open(os.path.join(RESULTS, "olmo2_heads.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
