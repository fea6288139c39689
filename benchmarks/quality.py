"""Quality of pruning methods on SmolLM2-135M: perplexity against parameters kept.

    python benchmarks/quality.py                       # the full grid (issue 6)
    python benchmarks/quality.py --methods snp,vbp --targets heads mlp,heads --sparsities 0.1,0.2,0.3 \
        --allocations uniform --name heads

Calibration: the first 32 windows of 512 tokens of the WikiText-2 validation text; evaluation:
the first 32 windows of 512 tokens of the WikiText-2 test text (both packaged with hf_snp).
Every row uses the same calibration tokens and seed. Writes benchmarks/results/NAME.md (table)
and NAME.png (perplexity against parameters kept, one line per method, target set and
allocation). Finished rows are kept in benchmarks/results/NAME.jsonl, so a stopped grid goes on
where it stopped (``--fresh`` starts over); the table lists the rows finished so far.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from contextlib import contextmanager

import torch
from measure import code_commit, first_windows
from row_cache import RowCache

import hf_snp
from hf_snp.evaluation.perplexity import perplexity
from hf_snp.passes.engine import StreamingEngine
from hf_snp.setup.calibration import packaged_text
from hf_snp.setup.loading import demo_model_source, load_model, load_tokenizer

RESULTS = os.path.join(os.path.dirname(__file__), "results")


class SharedDensePass:
    """Global allocation's dense statistics pass depends on the method and the target set, not on
    the sparsity: the grid runs it once per pair and gives its curves to the other sparsities.
    ``reused_seconds`` is the pass's measured time when a row reused it, so that each row's
    seconds are still those of a whole run."""

    def __init__(self):
        self.saved: dict[tuple, tuple[list, float]] = {}
        self.reused_seconds = 0.0

    @contextmanager
    def sharing(self, key: tuple):
        original, shared = StreamingEngine.collect_curves, self
        shared.reused_seconds = 0.0

        def collect_curves(engine, calib, rules):
            if key in shared.saved:
                curves, shared.reused_seconds = shared.saved[key]
                return copy.deepcopy(curves)
            start = time.perf_counter()
            curves = original(engine, calib, rules)
            shared.saved[key] = (copy.deepcopy(curves), time.perf_counter() - start)
            return curves

        StreamingEngine.collect_curves = collect_curves
        try:
            yield
        finally:
            StreamingEngine.collect_curves = original


# the Python source of the robustness check's calibration: standard-library modules, in this order
PYTHON_SOURCES = ("argparse", "dataclasses", "json.decoder", "json.encoder", "textwrap", "functools", "pathlib",
                  "inspect", "typing", "enum", "tarfile", "zipfile")


def python_source() -> str:
    """The source text of PYTHON_SOURCES (it depends on the Python version: recorded in the results)."""
    import importlib
    import inspect

    return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in PYTHON_SOURCES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="snp,vbp,flap,wanda_sp,magnitude,random")
    parser.add_argument("--targets", nargs="+", default=["mlp", "mlp,heads"], help="target sets, each comma-separated")
    parser.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--gqa-mode", default="per_group")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calibration", choices=("wikitext", "python"), default="wikitext",
                        help="calibration text: the WikiText-2 validation text, or Python source (the standard "
                             "library modules in PYTHON_SOURCES) for the robustness check; evaluation stays WikiText")
    parser.add_argument("--calibration-windows", type=int, help="calibration windows (default: --windows)")
    parser.add_argument("--allocations", default="uniform,global")
    parser.add_argument("--name", default="quality")
    parser.add_argument("--fresh", action="store_true", help="ignore rows finished by earlier runs")
    parser.add_argument("--all-rows", action="store_true",
                        help="list every finished row of NAME.jsonl with this protocol, not only this grid's")
    parser.add_argument("--variants", default='{"": {}}',
                        help="JSON {label: extra prune() options}: each method row is run once per variant and named "
                             "'method label' (e.g. '{\"dense target\": {\"reconstruction_target\": \"dense\"}}')")
    args = parser.parse_args()
    variants = json.loads(args.variants)

    source = demo_model_source()
    tokenizer = load_tokenizer(source)
    dense = load_model(source, dtype=torch.float32)
    calib_windows = args.calibration_windows or args.windows
    text = python_source() if args.calibration == "python" else packaged_text("wikitext2-local")
    calib = first_windows(tokenizer, text, calib_windows, args.seq_len)
    eval_args = dict(dataset="wikitext2-test-local", seq_len=args.seq_len, max_windows=args.windows, progress=False)
    dense_ppl = perplexity(dense, tokenizer, **eval_args)
    dense_params = hf_snp.count_parameters(dense)
    rows = [("dense", "-", "-", 0.0, dense_ppl, dense_params, 0.0, "-")]
    print(f"dense: perplexity {dense_ppl:.2f}, {dense_params:,} parameters", flush=True)
    cache_path = os.path.join(RESULTS, f"{args.name}.jsonl")
    if args.fresh and os.path.exists(cache_path):
        os.remove(cache_path)
    protocol = {"windows": args.windows, "seq_len": args.seq_len, "gqa_mode": args.gqa_mode,
                "dense": round(dense_ppl, 4)}
    if args.calibration != "wikitext" or calib_windows != args.windows:  # the default protocol keeps its old key
        protocol.update(calibration=args.calibration, calibration_windows=calib_windows)
    cache = RowCache(cache_path, protocol)
    dense_pass, commit = SharedDensePass(), code_commit()
    for allocation in args.allocations.split(","):
        for targets in args.targets:
            for sparsity in (float(s) for s in args.sparsities.split(",")):
                for method, label, options in ((m, f"{m} {label}".strip(), options)
                                               for m in args.methods.split(",") for label, options in variants.items()):
                    key = {"method": label, "targets": targets, "allocation": allocation, "sparsity": sparsity}
                    if options:
                        key["options"] = options
                    done = cache.get(key)
                    if done is None:
                        start = time.perf_counter()
                        with dense_pass.sharing((label, targets, allocation)):
                            result = hf_snp.prune(copy.deepcopy(dense), tokenizer, method=method, sparsity=sparsity,
                                                  targets=targets.split(","), allocation=allocation, calibration=calib,
                                                  gqa_mode=args.gqa_mode, progress=False, **options)
                        seconds = time.perf_counter() - start + dense_pass.reused_seconds
                        ppl = perplexity(result.model, tokenizer, **eval_args)
                        done = {"ppl": ppl, "params": result.report["params_after"], "seconds": seconds,
                                "commit": commit}
                        cache.put(key, done)
                        del result
                    rows.append((label, targets, allocation, sparsity, done["ppl"], done["params"], done["seconds"],
                                 done.get("commit", "?")))
                    print(f"{label:>9} {targets:>9} {allocation:>7} {sparsity:.0%}: perplexity {done['ppl']:9.2f}  "
                          f"params {done['params']:,}  {done['seconds']:.0f} s", flush=True)
                    write(args, rows, dense_params)
    if args.all_rows:
        grid = {(row[0], row[1], row[2], row[3]) for row in rows}
        for key, done in cache.rows.items():
            key = json.loads(key)
            if (key["method"], key["targets"], key["allocation"], key["sparsity"]) not in grid:
                rows.append((key["method"], key["targets"], key["allocation"], key["sparsity"], done["ppl"],
                             done["params"], done["seconds"], done.get("commit", "?")))
        rows[1:] = sorted(rows[1:], key=lambda r: (r[2] != "uniform", r[2], r[1], r[3], r[0]))
        write(args, rows, dense_params)


def pivot_tables(rows: list[tuple]) -> list[str]:
    """One perplexity table per target set and allocation: sparsity down, method across, best in bold."""
    lines: list[str] = []
    groups: dict[tuple[str, str], dict[float, dict[str, float]]] = {}
    methods: list[str] = []
    for method, targets, allocation, sparsity, ppl, *_ in rows:
        groups.setdefault((targets, allocation), {}).setdefault(sparsity, {})[method] = ppl
        methods += [method] if method not in methods else []
    for (targets, allocation), by_sparsity in groups.items():
        lines += ["", f"Perplexity, {targets}, {allocation} allocation:", "",
                  "| sparsity | " + " | ".join(methods) + " |", "| ---: |" + " ---: |" * len(methods)]
        for sparsity, results in by_sparsity.items():
            best = min(results.values())
            cells = ["" if m not in results
                     else (f"**{results[m]:.2f}**" if results[m] == best else f"{results[m]:.2f}") for m in methods]
            lines.append(f"| {sparsity:.0%} | " + " | ".join(cells) + " |")
    return lines


def write(args, rows, dense_params) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    lines = [
        f"# {args.name}: SmolLM2-135M, WikiText-2",
        "",
        (f"Calibration: first {args.calibration_windows or args.windows} x {args.seq_len} tokens of "
         + ("the validation text" if args.calibration == "wikitext" else
            f"Python {sys.version.split()[0]} standard-library source ({', '.join(PYTHON_SOURCES)})")
         + "; evaluation: first ")
        + f"{args.windows} x {args.seq_len} tokens of the test text; GQA mode {args.gqa_mode}; CPU, fp32. With global "
        "allocation the dense statistics pass is run once per method and target set (it does not depend on the "
        "sparsity); its measured seconds are counted in every row that used it.",
        "",
        "Regenerate: `python benchmarks/quality.py --methods " + args.methods + " --targets " + " ".join(args.targets)
        + f" --sparsities {args.sparsities} --allocations {args.allocations} --gqa-mode {args.gqa_mode} "
        f"--name {args.name}" + (f" --calibration {args.calibration}" if args.calibration != "wikitext" else "")
        + (f" --calibration-windows {args.calibration_windows}" if args.calibration_windows else "")
        + (f" --variants '{args.variants}'" if args.variants != '{"": {}}' else "")
        + (" --all-rows" if args.all_rows else "") + "`",
        "",
        "Pruning seconds depend on the code they were measured with (`timed at`: its commit); perplexity and "
        "parameters do not (the speed-ups in between are tested to give the same pruned weights).",
        "",
        "| method | targets | allocation | sparsity | perplexity | parameters after | pruning s | timed at |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for method, targets, allocation, sparsity, ppl, params, seconds, commit in rows:
        lines.append(f"| {method} | {targets} | {allocation} | {sparsity:.0%} | {ppl:.2f} | {params:,} | "
                     f"{seconds:.0f} | {commit} |")
    lines += pivot_tables(rows[1:])
    lines += ["", "Best method per setting (target: snp from 20% up):", "",
              "| targets | allocation | sparsity | best | snp rank |", "| --- | --- | ---: | --- | ---: |"]
    settings: dict[tuple, list[tuple[float, str]]] = {}
    for method, targets, allocation, sparsity, ppl, *_ in rows[1:]:
        settings.setdefault((targets, allocation, sparsity), []).append((ppl, method))
    for (targets, allocation, sparsity), results in settings.items():
        ranked = [m for _, m in sorted(results)]
        snp = next((m for m in ranked if m.startswith("snp")), None)
        rank = f"{ranked.index(snp) + 1} of {len(ranked)} ({snp})" if snp else "-"
        lines.append(f"| {targets} | {allocation} | {sparsity:.0%} | {ranked[0]} | {rank} |")
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target_sets = list(dict.fromkeys(row[1] for row in rows[1:]))
    methods = list(dict.fromkeys(row[0] for row in rows[1:]))
    fig, axes = plt.subplots(1, max(1, len(target_sets)), figsize=(6 * max(1, len(target_sets)), 4.5), squeeze=False,
                             sharey=True)
    series: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for method, targets, allocation, _, ppl, params, *_ in rows[1:]:
        series.setdefault((method, targets, allocation), []).append((params / dense_params, ppl))
    for ax, targets in zip(axes[0], target_sets):  # one panel per target set, one colour per method
        for (method, set_, allocation), points in series.items():
            if set_ != targets:
                continue
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{methods.index(method) % 10}",
                    marker="o" if allocation == "uniform" else "x", linestyle="-" if allocation == "uniform" else ":",
                    label=f"{method}, {allocation}")
        ax.axhline(rows[0][4], color="grey", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("fraction of parameters kept")
        ax.set_title(f"SmolLM2-135M, {targets} ({args.name})")
        ax.legend(fontsize=6, ncol=2)
    axes[0][0].set_ylabel("WikiText-2 perplexity")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"{args.name}.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
