"""Seconds of each part of one site's decision: SmolLM2-135M, layer 12's MLP (1536 units), 30% removed.

    python benchmarks/decide_profile.py [--layer 12] [--repeats 3]

The site's statistics are taken from the first 32 x 512 tokens of the packaged WikiText-2 validation text (two
folds, the held-out ridge's), once; then each part is timed (the least of ``--repeats``): the moments, OBS's
batched order (and in float32, with whether its order is float64's), the ZCA order, the held-out ridge choice,
the mean-shift held-out error, the least-squares map, the default decision and ``ordering="heldout"``'s
(docs/design.md §3.10, §3.12). The load average is recorded: on a busy machine (above 1 before the run) the table
says so. Writes benchmarks/results/decide_profile.md.

With ``--agreement`` it also orders every MLP site of the model at 10%, 30% and 50% in float64 and with
``single=True`` (float32 where the moment's pivots allow it, docs/design.md §3.10) and tabulates whether the same
units went.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from measure import code_commit

from hf_snp.config import PruneConfig
from hf_snp.methods.snp import SNP
from hf_snp.setup.calibration import load_calibration
from hf_snp.setup.loading import demo_model_source, load_model, load_tokenizer
from hf_snp.units.elimination import SINGLE_PIVOT_SPAN, batched_obs_elimination
from hf_snp.units.linalg import damped, greedy_zca_elimination, least_squares_map
from hf_snp.units.removal import RemovalPlan
from hf_snp.units.ridge import heldout_mean_error, ridge_and_error
from hf_snp.units.site_inputs import SiteInputs
from hf_snp.units.stats import SiteStatistics

RESULTS = os.path.join(os.path.dirname(__file__), "results")
CPU = torch.device("cpu")


def site_statistics() -> tuple[list[SiteStatistics], list[torch.Tensor]]:
    """Every MLP site's statistics (two folds) and consumer weight."""
    source = demo_model_source()
    tokenizer, model = load_tokenizer(source), load_model(source, dtype=torch.float32)
    calib = load_calibration("wikitext2-local", tokenizer, 32, 512, seed=0)
    consumers = [layer.mlp.down_proj for layer in model.model.layers]
    stats = [SiteStatistics("site", consumer.in_features, CPU, folds=2) for consumer in consumers]
    handles = [consumer.register_forward_pre_hook(s.hook) for consumer, s in zip(consumers, stats)]
    with torch.no_grad():
        for start in range(0, calib.input_ids.shape[0], 8):
            model.model(calib.input_ids[start:start + 8])
    for handle in handles:
        handle.remove()
    return stats, [consumer.weight.detach().clone() for consumer in consumers]


def agreement(stats: list[SiteStatistics], weights: list[torch.Tensor], damping: float) -> list[str]:
    """Per site: the float32 pivots' span, whether single=True runs in float32, and at 10/30/50% whether the order
    in float32 (on every site, the bound aside) removed float64's units (the first step whose unit differs) and how
    far its error sum is from float64's."""
    rows = ["| layer | pivot span (float32) | single=True in float32 | 10% | 30% | 50% |",
            "| ---: | ---: | --- | --- | --- | --- |"]
    for layer, (site, weight) in enumerate(zip(stats, weights)):
        moment, _ = site.moments(False)
        pivots = torch.linalg.cholesky(damped(moment.float(), damping)).diagonal().square()
        cells = []
        for fraction in (0.1, 0.3, 0.5):
            count = round(fraction * moment.shape[0])
            double = batched_obs_elimination(moment, weight, count, damping)
            single = batched_obs_elimination(moment.float(), weight.float(), count, damping)
            first = next((step for step, (a, b) in enumerate(zip(double.removed, single.removed)) if a != b), None)
            same = "same units" if set(double.removed) == set(single.removed) else "**other units**"
            order = "same order" if first is None else f"order differs from step {first}"
            gap = abs(sum(single.errors) - sum(double.errors)) / sum(double.errors)
            cells.append(f"{same}, {order}, sums {gap:.0e} apart")
        taken = batched_obs_elimination(moment, weight, 1, damping, single=True).single
        rows.append(f"| {layer} | {float(pivots.max() / pivots.min()):.1e} | {'yes' if taken else 'no'} | "
                    + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agreement", action="store_true", help="float32 against float64 on every MLP site")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # before the statistics' own forward passes raise it
    all_stats, weights = site_statistics()
    stats, weight = all_stats[args.layer], weights[args.layer]
    units = weight.shape[1]
    plan = RemovalPlan(units, 1, [list(range(units))], round(0.3 * units))
    site = SiteInputs(stats, plan, False, weight, 0)
    config = PruneConfig()
    moment, _ = stats.moments(False)
    removed = batched_obs_elimination(moment, weight, plan.rounds, config.damping)[0]
    decision = plan.decision(removed, CPU)
    parts = {
        "moments (n x n, float64)": lambda: stats.moments(False),
        "OBS order, float64": lambda: batched_obs_elimination(moment, weight, plan.rounds, config.damping),
        "OBS order, single=True (float32 where the pivots allow)": lambda: batched_obs_elimination(
            moment, weight, plan.rounds, config.damping, single=True),
        "ZCA order": lambda: greedy_zca_elimination(moment, plan.rounds, config.damping, None),
        "held-out ridge choice": lambda: ridge_and_error(stats, False, weight, decision.keep, decision.drop,
                                                         config.damping),
        "mean-shift held-out error": lambda: heldout_mean_error(stats, False, weight, decision.drop),
        "least-squares map": lambda: least_squares_map(moment, decision.keep, decision.drop, 1e-3),
        "decision, default ordering": lambda: SNP().decide(site, config),
        "decision, ordering='heldout'": lambda: SNP().decide(site, PruneConfig(ordering="heldout")),
    }
    rows = []
    for name, part in parts.items():
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            part()
            best = min(best, time.perf_counter() - start)
        rows.append(f"| {name} | {best:.3f} |")
        print(rows[-1], flush=True)
    single = batched_obs_elimination(moment, weight, plan.rounds, config.damping, single=True)
    chosen = SNP().decide(site, PruneConfig(ordering="heldout"))
    load_after = os.getloadavg()[0]
    lines = [f"# One decision's parts: SmolLM2-135M layer {args.layer} MLP ({units} units), 30% removed", "",
             f"CPU ({os.cpu_count()} cores), torch {torch.__version__}, hf_snp at commit {code_commit()}. Regenerate: "
             f"`python benchmarks/decide_profile.py --layer {args.layer}`. Statistics of 32 x 512 WikiText-2 tokens; "
             f"least of {args.repeats} runs. Load average {load_before:.2f} before, {load_after:.2f} after.", "",
             *(["**Taken on a busy machine: not a result.**", ""] if load_before > 1.0 else []),
             "| part | seconds |", "| --- | ---: |", *rows, "",
             f"single=True ran in float32: {single.single}; its order is float64's: {single.removed == removed} "
             f"(same units removed: {set(single.removed) == set(removed)}). "
             f"ordering='heldout' chose `{chosen.choice}`; held-out errors: "
             + ", ".join(f"{k} {v:.4g}" for k, v in chosen.candidate_errors.items()) + ".", ""]
    if args.agreement:
        lines += ["## float32 against float64 on every MLP site", "",
                  "OBS orders of each site in float32 (on every site, whatever its pivots) and in float64; "
                  f"`single=True` takes float32 where the pivots span less than {SINGLE_PIVOT_SPAN:.0e}. "
                  "*sums apart*: the relative difference of the step errors' sums.", "",
                  *agreement(all_stats, weights, config.damping), ""]
    with open(os.path.join(RESULTS, "decide_profile.md"), "w") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    main()
