"""SNP's default beside the other candidates, on every protocol measured: benchmarks/results/defaults_summary.md.

    python benchmarks/defaults_summary.py

Reads the rows that ``benchmarks/quality.py`` finished for SmolLM2-135M under three protocols (WikiText-2 test
perplexity of the first 32 x 512 tokens in every one):

* ``defaults``: calibration on the first 32 x 512 tokens of the WikiText-2 validation text (the developers' protocol);
* ``defaults_16windows``: the first 16 x 512 tokens of it;
* ``defaults_python``: 32 x 512 tokens of Python standard-library source (another text).

Candidates: the paper's SNP (ZCA order, fixed ridge), VBP and FLAP, SNP's OBS order with the held-out ridge (the
default before the per-site choice) and ``ordering='heldout'``. The default is the column of today's
``PruneConfig().resolved_ordering``. The tiny models of the post-norm families are in defaults_tiny.md
(benchmarks/defaults_tiny.py).

    python benchmarks/quality.py --methods snp --targets mlp --sparsities 0.3,0.5 --allocations uniform \\
        --name defaults --variants '{"paper": {"ordering": "zca", "ridge": "fixed"}, "obs": {"ordering": "obs"},
        "heldout": {"ordering": "heldout"}}'          # and --methods vbp,flap; the same with --calibration-windows 16
                                                      # --name defaults_16windows, --calibration python --name ...
"""

from __future__ import annotations

import json
import os

from hf_snp.config import PruneConfig

RESULTS = os.path.join(os.path.dirname(__file__), "results")
PROTOCOLS = {"defaults": "WikiText 32 x 512 (developers')", "defaults_16windows": "WikiText 16 x 512",
             "defaults_python": "Python source 32 x 512"}
BASELINES = {"paper SNP": "snp paper", "VBP": "vbp", "FLAP": "flap"}
OURS = {"OBS + held-out ridge": "snp obs", "per-site choice": "snp heldout"}


def finished_rows(name: str) -> dict[tuple[str, str, float], float]:
    """(method label, targets, sparsity) -> perplexity, uniform allocation."""
    path = os.path.join(RESULTS, f"{name}.jsonl")
    rows = {}
    if not os.path.exists(path):
        return rows
    with open(path) as handle:
        for line in handle:
            entry = json.loads(line)
            key = entry["key"]
            if key["allocation"] == "uniform":
                rows[(key["method"], key["targets"], key["sparsity"])] = entry["row"]["ppl"]
    return rows


def main() -> None:
    default = {"heldout": "per-site choice", "obs": "OBS + held-out ridge"}[PruneConfig().resolved_ordering]
    header = ["protocol", "MLP removed", *BASELINES, "best of the three", *OURS, f"default ({default})", "at or below"]
    lines = ["# SNP's default beside the other candidates: SmolLM2-135M, WikiText-2 test perplexity", "",
             "Regenerate: `python benchmarks/defaults_summary.py` (reads the rows of `benchmarks/quality.py`; the "
             "commands are in its docstring). Perplexity of the first 32 x 512 test tokens (dense 28.14); each "
             "protocol's calibration in the first column; lower is better.", "",
             "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 2) + " :-: |"]
    met = total = 0
    for name, protocol in PROTOCOLS.items():
        rows = finished_rows(name)
        for sparsity in (0.1, 0.3, 0.5):
            found = {label: rows.get((method, "mlp", sparsity)) for label, method in {**BASELINES, **OURS}.items()}
            if found[default] is None:
                continue
            baselines = [found[label] for label in BASELINES if found[label] is not None]
            best = min(baselines) if baselines else None
            ok = best is not None and found[default] <= best
            met, total = met + ok, total + (best is not None)
            cells = ["-" if v is None else f"{v:.2f}" for v in found.values()]
            best_cell = "-" if best is None else f"{best:.2f}"
            verdict = "-" if best is None else "yes" if ok else "no"
            lines.append(f"| {protocol} | {sparsity:.0%} | {' | '.join(cells[:3])} | {best_cell} | "
                         f"{' | '.join(cells[3:])} | {found[default]:.2f} | {verdict} |")
    heads = finished_rows("defaults").get(("snp heldout", "mlp,heads", 0.3))
    lines += ["", f"The default at or below the best of the paper's SNP, VBP and FLAP: {met} of {total} settings.", ""]
    if heads is not None:
        lines += [f"30% of MLP and heads together (developers' protocol), per-site choice: {heads:.2f}.", ""]
    with open(os.path.join(RESULTS, "defaults_summary.md"), "w") as handle:
        handle.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
