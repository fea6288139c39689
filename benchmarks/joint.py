"""Blocks and units together on SmolLM2-135M (issue 18): the iterative search, the three-candidate search, blocks
only and units only, at one budget of decoder-layer parameters.

    python benchmarks/joint.py [--sparsities 0.2,0.3,0.4] [--windows 16] [--units mlp,heads mlp]

The ablation protocol: calibration on the first WINDOWS x 512 tokens of the WikiText-2 validation text, evaluation
on the first WINDOWS x 512 tokens of the test text, SNP, uniform allocation, GQA per_group. The budget of every row
is ``sparsity`` x (all decoder-layer parameters): "units only" prunes the unit targets with the sparsity that
removes as many parameters. "blocks only" is ShortGPT's Block Influence (Men et al., 2024): the blocks with the
lowest 1 - cos(input, output), removed in one shot. Writes benchmarks/results/joint.md and joint.png; finished
rows are kept in benchmarks/results/joint.jsonl (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from measure import RssPeak, code_commit, dense_forward_seconds, model_bytes, save_line_plot, smollm2_protocol
from row_cache import RowCache

import hf_snp
from hf_snp.adapters import get_adapter
from hf_snp.evaluation.perplexity import perplexity
from hf_snp.units.sites import count_parameters

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def rows_for(units: list[str]) -> dict[str, dict]:
    """label -> prune() options; "units" is replaced by the unit-only sparsity."""
    rows = {"blocks only (ShortGPT block influence)": {"targets": ("blocks",)}}
    for unit in units:
        targets = tuple(unit.split(","))
        name = "+".join(targets)
        rows[f"iterative ({name} + blocks)"] = {"targets": targets + ("blocks",), "block_search": "iterative"}
        rows[f"three candidates ({name} + blocks)"] = {"targets": targets + ("blocks",), "block_search": "candidates"}
        rows[f"units only ({name})"] = {"targets": targets, "units_only": True}
    return rows


def unit_sparsity(model, targets: tuple[str, ...], sparsity: float) -> float:
    """The unit sparsity that removes ``sparsity`` of all decoder-layer parameters."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    sites = sum(site.num_params() for i, layer in enumerate(layers)
                for site in adapter.sites(layer, i, targets, model.config, "per_group"))
    return sparsity * sum(count_parameters(layer) for layer in layers) / sites


def summary(report) -> str:
    blocks = report.get("blocks")
    if blocks is None:
        return ""
    if "rounds" in blocks:
        kept = "".join("B" if r["kept"] == "block" else "U" for r in blocks["rounds"])
        return f"{len(blocks['removed'])} blocks; rounds {kept}"
    if "chosen" in blocks:
        return f"{len(blocks['removed'])} blocks; chose {blocks['chosen']}"
    return f"{len(blocks['removed'])} blocks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.2,0.3,0.4")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--units", nargs="+", default=["mlp,heads", "mlp"], help="unit target sets, comma-separated")
    parser.add_argument("--fresh", action="store_true", help="ignore rows finished by earlier runs")
    args = parser.parse_args()

    tokenizer, dense, calib, eval_args, dense_ppl = smollm2_protocol(args.windows, args.seq_len)
    forward = dense_forward_seconds(dense, calib, 8, torch.device("cpu"))
    print(f"dense: perplexity {dense_ppl:.2f}; a forward pass over the calibration tokens {forward:.2f} s", flush=True)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    cache_path = os.path.join(RESULTS, "joint.jsonl")
    if args.fresh and os.path.exists(cache_path):
        os.remove(cache_path)
    cache = RowCache(cache_path, {"windows": args.windows, "seq_len": args.seq_len, "dense": round(dense_ppl, 4)})
    table: dict[str, dict[float, dict]] = {}
    for label, options in rows_for(args.units).items():
        for sparsity in sparsities:
            key = {"label": label, "sparsity": sparsity}
            row = cache.get(key)
            if row is None:
                kwargs = dict(options)
                if kwargs.pop("units_only", False):
                    kwargs["sparsity"] = unit_sparsity(dense, kwargs["targets"], sparsity)
                else:
                    kwargs["sparsity"] = sparsity
                before = RssPeak.now()
                start = time.perf_counter()
                with RssPeak() as rss:  # the copy of the dense model pruned in place counts: one model
                    result = hf_snp.prune(copy.deepcopy(dense), tokenizer, method="snp", calibration=calib,
                                          progress=False, **kwargs)
                seconds = time.perf_counter() - start
                row = {"ppl": perplexity(result.model, tokenizer, **eval_args),
                       "params": result.report["params_after"], "seconds": seconds,
                       "summary": summary(result.report), "commit": code_commit(),
                       "round_seconds": [r["seconds"] for r in result.report.get("blocks", {}).get("rounds", [])],
                       "peak_models": (rss.peak - before) / model_bytes(dense)}
                cache.put(key, row)
                del result
            table.setdefault(label, {})[sparsity] = row
            print(f"{label:>44} {sparsity:.0%}: perplexity {row['ppl']:9.2f}  params {row['params']:,}  "
                  f"{row['seconds']:.0f} s  {row['summary']}", flush=True)
    write(args, table, dense_ppl, count_parameters(dense), sparsities, forward)


def per_round(row: dict, forward: float) -> str:
    """An iterative row's mean seconds per round, in dense forward passes over the calibration tokens (rows
    cached before round times were kept: their seconds over their rounds)."""
    kept = row["summary"].partition("rounds ")[2]  # one letter a round
    if not kept:
        return ""
    seconds = sum(row.get("round_seconds") or []) or row["seconds"]
    return f"; {seconds / len(kept) / forward:.0f} dense forwards per round"


def write(args, table, dense_ppl, dense_params, sparsities, forward) -> None:
    header = " | ".join(f"{s:.0%}" for s in sparsities)
    rule = "| --- | " + " | ".join("---:" for _ in sparsities) + " |"
    lines = [
        "# Blocks and units together: SmolLM2-135M, WikiText-2 perplexity",
        "",
        f"Budget: the sparsity of all decoder-layer parameters. Calibration: first {args.windows} x {args.seq_len} "
        f"tokens of the validation text; evaluation: first {args.windows} x {args.seq_len} tokens of the test text; "
        f"dense {dense_ppl:.2f} ({dense_params:,} parameters). SNP at its defaults (OBS order, held-out ridge), "
        "uniform allocation, GQA per_group, CPU, fp32. "
        "The iterative search holds out one calibration window in four for its CKA and fits on the others.",
        "",
        f"Regenerate: `python benchmarks/joint.py --sparsities {args.sparsities} --windows {args.windows} "
        f"--units {' '.join(args.units)}`",
        "",
        f"| setting | {header} |",
        rule,
    ]
    best = {s: min(row[s]["ppl"] for row in table.values()) for s in sparsities}
    for label, row in table.items():
        cells = [f"**{row[s]['ppl']:.2f}**" if row[s]["ppl"] == best[s] else f"{row[s]['ppl']:.2f}" for s in sparsities]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "What each run removed (B: a block round, U: a unit round), parameters after, pruning seconds, peak "
              "memory:", "",
              f"| setting | {header} |", rule]
    for label, row in table.items():
        cells = [f"{row[s]['summary'] or '-'}; {row[s]['params']:,}; {row[s]['seconds']:.0f} s"
                 + (f"; peak {row[s]['peak_models']:.2f} models" if "peak_models" in row[s] else "")
                 + per_round(row[s], forward)
                 for s in sparsities]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Pruning seconds depend on the machine's load at the time (commit of each row in joint.jsonl). Peak: "
              "the process's peak resident memory while pruning above its memory before copying the dense model, in "
              "dense-model sizes (the pruned copy itself is one); one process runs every row, so the allocator's "
              f"cached pages carry over between rows. Dense forwards: seconds over one dense forward pass over the "
              f"{args.windows} x {args.seq_len} calibration tokens ({forward:.2f} s when the table was written)."]
    with open(os.path.join(RESULTS, "joint.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    save_line_plot(os.path.join(RESULTS, "joint.png"),
                   {label: [(s * 100, row[s]["ppl"]) for s in sparsities] for label, row in table.items()},
                   "sparsity of decoder-layer parameters (%)", "WikiText-2 perplexity",
                   "Blocks and units on SmolLM2-135M", reference=("dense", dense_ppl), logy=True, size=(7.5, 4.5),
                   legend_size=7)


if __name__ == "__main__":
    main()
