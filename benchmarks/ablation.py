"""Ablations of SNP on SmolLM2-135M (mlp + heads): orders, reconstruction, its target and ridge, allocation, blocks.

    python benchmarks/ablation.py [--sparsities 0.2,0.3,0.4] [--windows 16]

Every row prunes a copy of the same dense model with the same calibration windows (the first
WINDOWS x 512 tokens of the WikiText-2 validation text) and is evaluated on the first
WINDOWS x 512 tokens of the test text. Writes benchmarks/results/ablation.md and ablation.png.
Finished rows are kept in benchmarks/results/ablation.jsonl: a stopped run goes on where it
stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

from measure import save_line_plot, smollm2_protocol
from row_cache import RowCache

import hf_snp
from hf_snp.evaluation.perplexity import perplexity

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# every row is one change from the paper's SNP (ZCA order, fixed ridge, uniform allocation), hf_snp's default before
# issue 15 made OBS with the held-out ridge the default (its own row)
PAPER = {"ordering": "zca", "ridge": "fixed"}
ROWS = {  # label -> prune() options on top of method="snp", targets=("mlp", "heads") and PAPER
    "zca, uniform (the paper's; default before issue 15)": {},
    "OBS order + held-out ridge (default since issue 15)": {"ordering": "obs", "ridge": "heldout"},
    "natural order": {"ordering": "natural"},
    "random order": {"ordering": "random"},
    "output-aware order": {"ordering": "output_aware"},
    "OBS order (W updated)": {"ordering": "obs"},
    "no reconstruction": {"reconstruct": False},
    "dense-target reconstruction": {"reconstruction_target": "dense"},
    "heads cut before MLP statistics": {"within_block": "sequential"},
    "dense target, heads first": {"reconstruction_target": "dense", "within_block": "sequential"},
    "ridge chosen on held-out tokens": {"ridge": "heldout"},
    "global allocation": {"allocation": "global"},
    "with blocks (candidate search)": {"targets": ("mlp", "heads", "blocks"), "block_search": "candidates"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.2,0.3,0.4")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--fresh", action="store_true", help="ignore rows finished by earlier runs")
    args = parser.parse_args()

    tokenizer, dense, calib, eval_args, dense_ppl = smollm2_protocol(args.windows, args.seq_len)
    print(f"dense: perplexity {dense_ppl:.2f}", flush=True)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    cache_path = os.path.join(RESULTS, "ablation.jsonl")
    if args.fresh and os.path.exists(cache_path):
        os.remove(cache_path)
    cache = RowCache(cache_path, {"windows": args.windows, "seq_len": args.seq_len, "dense": round(dense_ppl, 4)})
    table: dict[str, dict[float, tuple[float, int, float]]] = {}
    for label, options in ROWS.items():
        for sparsity in sparsities:
            done = cache.get({"label": label, "sparsity": sparsity})
            if done is not None:
                table.setdefault(label, {})[sparsity] = (done["ppl"], done["params"], done["seconds"])
                print(f"{label:>32} {sparsity:.0%}: perplexity {done['ppl']:9.2f}  (earlier run)", flush=True)
                continue
            kwargs = {"targets": ("mlp", "heads"), **PAPER, **options}
            start = time.perf_counter()
            result = hf_snp.prune(copy.deepcopy(dense), tokenizer, method="snp", sparsity=sparsity, calibration=calib,
                                  progress=False, **kwargs)
            seconds = time.perf_counter() - start
            ppl = perplexity(result.model, tokenizer, **eval_args)
            table.setdefault(label, {})[sparsity] = (ppl, result.report["params_after"], seconds)
            cache.put({"label": label, "sparsity": sparsity},
                      {"ppl": ppl, "params": result.report["params_after"], "seconds": seconds})
            extra = f" chosen {result.report['blocks']['chosen']}" if "blocks" in result.report else ""
            print(f"{label:>32} {sparsity:.0%}: perplexity {ppl:9.2f}  params {result.report['params_after']:,}  "
                  f"{seconds:.0f} s{extra}", flush=True)
            del result
    write(args, table, dense_ppl, sparsities)


def write(args, table, dense_ppl, sparsities) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    header = " | ".join(f"{s:.0%}" for s in sparsities)
    lines = [
        "# SNP ablations: SmolLM2-135M, mlp + heads, WikiText-2 perplexity",
        "",
        f"Calibration: first {args.windows} x {args.seq_len} tokens of the validation text (same for every row); "
        f"evaluation: first {args.windows} x {args.seq_len} tokens of the test text; dense {dense_ppl:.2f}. "
        "CPU, fp32, GQA per_group.",
        "",
        f"Regenerate: `python benchmarks/ablation.py --sparsities {args.sparsities} --windows {args.windows}`",
        "",
        f"| variant | {header} |",
        "| --- | " + " | ".join("---:" for _ in sparsities) + " |",
    ]
    for label, row in table.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[s][0]:.2f}" for s in sparsities) + " |")
    lines += ["", "Parameters after and pruning seconds:", "", f"| variant | {header} |",
              "| --- | " + " | ".join("---:" for _ in sparsities) + " |"]
    for label, row in table.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[s][1]:,} / {row[s][2]:.0f} s" for s in sparsities) + " |")
    with open(os.path.join(RESULTS, "ablation.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")

    save_line_plot(os.path.join(RESULTS, "ablation.png"),
                   {label: [(s * 100, row[s][0]) for s in sparsities] for label, row in table.items()},
                   "sparsity of mlp + heads parameters (%)", "WikiText-2 perplexity", "SNP ablations on SmolLM2-135M",
                   reference=("dense", dense_ppl), logy=True, size=(7, 4.5), legend_size=7)

if __name__ == "__main__":
    main()
