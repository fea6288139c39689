"""Which error should SNP minimise where a norm follows the consumer (docs/design.md §3.11)?

    python benchmarks/post_norm_metric.py

Synthetic sites, each 16 units into an 8-dimensional consumer output followed by an RMS norm: units 0-7 (4 latent
factors plus noise, activations x4) feed outputs 0-3, whose norm gain is 0.02; units 8-15 (x0.3) feed outputs 4-7,
gain 3; every token is scaled by exp(1.5 N(0, 1)) (a heavy-tailed RMS). 600 tokens, noise 0.1 and 0.3, 2 / 4 / 6
units removed, seeds 0-3. SNP's OBS order and least-squares map (held-out ridge) are run on three objectives:

* raw: the consumer-output error (no post-norm weighting);
* diagonal: tokens weighted by 1/r², outputs by the norm's gain (the norm's Jacobian without its projection);
* full: the first-order metric of ``PostNormMetric`` (tokens weighted by 1/r², S^½ W; what hf_snp does).

Each decision is scored by brute force: the mean over tokens of |norm(pruned output) − norm(dense output)|².
Writes benchmarks/results/post_norm_metric.md.
"""

from __future__ import annotations

import os

import torch
from measure import code_commit

from hf_snp.config import PruneConfig
from hf_snp.methods.snp import SNP
from hf_snp.units.removal import RemovalPlan
from hf_snp.units.site_inputs import SiteInputs
from hf_snp.units.stats import PostNormMetric, SiteStatistics

CPU = torch.device("cpu")
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def site(seed: int, noise: float):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    tokens = 600
    scale = torch.exp(1.5 * randn(tokens, 1))
    big = 4.0 * (randn(tokens, 4) @ randn(4, 8) + noise * randn(tokens, 8))
    small = 0.3 * (randn(tokens, 4) @ randn(4, 8) + noise * randn(tokens, 8))
    weight = torch.zeros(8, 16, dtype=torch.float64)
    weight[:4, :8], weight[4:, 8:] = randn(4, 8), randn(4, 8)
    gain = torch.tensor([0.02] * 4 + [3.0] * 4, dtype=torch.float64)
    return scale * torch.cat([big, small], 1), weight, gain


def rms_norm(y: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    return gain * y / (y.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()


def decide(x, weight, gain, objective: str, removed: int):
    y = x @ weight.T
    metric = PostNormMetric(gain, 1e-6, CPU)
    stats = SiteStatistics("s", x.shape[1], CPU, 2, post_norm=metric if objective != "raw" else None)
    if objective == "raw":
        stats.update(x)
    else:
        stats.update_after_norm(x, y)
    inputs = SiteInputs(stats, RemovalPlan(x.shape[1], 1, [list(range(x.shape[1]))], removed), False, weight, 0)
    if objective == "diagonal":  # replaces S^½ by the gain alone
        inputs.objective_weight = weight * gain[:, None] * stats.mean_weight ** 0.5
    return SNP().decide(inputs, PruneConfig(ordering="obs"))


def post_norm_error(x, weight, gain, decision) -> float:
    keep_w, _ = decision.fold(weight)
    pruned = x[:, decision.keep] @ keep_w.T
    return float((rms_norm(pruned, gain) - rms_norm(x @ weight.T, gain)).pow(2).sum(-1).mean())


def main() -> None:
    objectives = ("raw", "diagonal", "full")
    rows, totals, wins = [], dict.fromkeys(objectives, 0.0), dict.fromkeys(objectives[1:], 0)
    for noise in (0.1, 0.3):
        for removed in (2, 4, 6):
            for seed in range(4):
                x, weight, gain = site(seed, noise)
                errors = {o: post_norm_error(x, weight, gain, decide(x, weight, gain, o, removed)) for o in objectives}
                for o in objectives:
                    totals[o] += errors[o]
                for o in objectives[1:]:
                    wins[o] += errors[o] < errors["raw"]
                rows.append(f"| {noise} | {removed} | {seed} | " + " | ".join(f"{errors[o]:.5f}" for o in objectives)
                            + " |")
                print(rows[-1], flush=True)
    lines = ["# Post-norm error: which objective (synthetic sites)", "",
             f"hf_snp at commit {code_commit()}. Regenerate: `python benchmarks/post_norm_metric.py` (seconds).", "",
             "Mean over tokens of |norm(pruned output) - norm(dense output)|^2 of each objective's decision (lower is "
             "better); sites and objectives in the script's docstring.", "",
             "| noise | removed | seed | raw | diagonal | full (hf_snp) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |",
             *rows, "", f"Sites where the objective beats raw: diagonal {wins['diagonal']} of {len(rows)}, full "
             f"{wins['full']} of {len(rows)}. Sum over sites: raw {totals['raw']:.4f}, diagonal "
             f"{totals['diagonal']:.4f}, full {totals['full']:.4f}.", ""]
    with open(os.path.join(RESULTS, "post_norm_metric.md"), "w") as handle:
        handle.write("\n".join(lines))
    print(lines[-2])


if __name__ == "__main__":
    main()
