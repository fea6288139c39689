"""Pruned chat models keep answering: SmolLM2-135M-Instruct pruned with different calibration data,
judged against the dense model on WikiText and on its own chat replies.

    python benchmarks/chat.py                  # the grid, in priority order; finished rows are skipped
    python benchmarks/chat.py --limit 4        # at most 4 new rows this time (--limit 0: rewrite the table only)

Calibration (32 x 256 tokens, seed 0): ``wikitext`` (WikiText-2 validation, packaged), ``chat`` (the 44
conversations shipped in hf_snp/data/chat rendered with the chat template, packed), ``self`` (text the dense model
writes in its chat template), mixtures (``self+wikitext``: half the windows from each; ``3:1``: three quarters
from the first), ``self, no template`` (the model's self text with its chat template removed: continued from BOS,
as for a model without a template). Evaluation: the first 12 x 512 tokens of the WikiText-2 test text
(perplexity, KL(dense || pruned) and top-1 agreement over the dense top-64 plus a tail bucket) and the 40 shipped
prompts (greedy replies of at most 48 tokens: KL and agreement teacher-forced on the dense replies, the share of
empty replies). Finished rows are kept in
benchmarks/results/chat.jsonl; the table is benchmarks/results/chat.md, the plot chat.png.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from measure import code_commit
from row_cache import RowCache

import hf_snp
from hf_snp.evaluation.divergence import TopK, kl_full, kl_topk
from hf_snp.evaluation.reference import DenseReference, compare
from hf_snp.setup.calibration import CalibrationData, load_calibration
from hf_snp.setup.loading import demo_model_source, load_model, load_tokenizer

RESULTS = os.path.join(os.path.dirname(__file__), "results")
CACHE = os.path.join(os.path.dirname(__file__), ".cache", "chat")
CALIBRATIONS = {"wikitext": "wikitext2-local", "chat": "chat-local", "self": "self",
                "self+wikitext": {"self": 0.5, "wikitext2-local": 0.5},
                "self+wikitext 3:1": {"self": 0.75, "wikitext2-local": 0.25},
                "chat+wikitext": {"chat-local": 0.5, "wikitext2-local": 0.5},
                "self+chat": {"self": 0.5, "chat-local": 0.5},
                "self, no template": "self", "self, no template+wikitext": {"self": 0.5, "wikitext2-local": 0.5}}
NUM_SAMPLES, SEQ_LEN, SEED = 32, 256, 0
EVAL = {"windows": 12, "seq_len": 512, "max_new_tokens": 48, "k": 64, "batch_size": 4}


def grid() -> list[dict]:
    """The rows in the order that decides the chat default first: 30% MLP SNP by calibration, then 50%, then VBP
    and FLAP (on the chosen mixture and on WikiText), then the other calibrations, 10% and mlp+heads."""
    main = ["wikitext", "chat", "self", "self+wikitext", "self+wikitext 3:1", "chat+wikitext"]
    chosen = ("self+wikitext 3:1", "wikitext")
    rows = [dict(method="snp", targets="mlp", sparsity=s, calibration=c) for s in (0.3, 0.5) for c in main]
    rows += [dict(method=m, targets="mlp", sparsity=s, calibration=c) for m in ("vbp", "flap") for s in (0.3, 0.5)
             for c in chosen]
    no_template = ("self, no template", "self, no template+wikitext")
    rows += [dict(method="snp", targets="mlp", sparsity=0.3, calibration=c) for c in ("self+chat", *no_template)]
    rows += [dict(method="snp", targets="mlp", sparsity=0.5, calibration=c) for c in no_template]
    rows += [dict(method="snp", targets=t, sparsity=s, calibration=c) for t, s in (("mlp", 0.1), ("mlp,heads", 0.3))
             for c in (*main[:5], no_template[1])]
    rows += [dict(method=m, targets=t, sparsity=s, calibration=c) for m in ("vbp", "flap")
             for t, s in (("mlp", 0.1), ("mlp,heads", 0.3)) for c in chosen]
    rows += [dict(method=m, targets="mlp", sparsity=s, calibration=c) for m in ("vbp", "flap") for s in (0.3, 0.5)
             for c in ("chat", "self", "self+wikitext")]
    return rows


def calibration(name: str, dense, tokenizer) -> CalibrationData:
    """The calibration windows of ``name``, made once and kept in benchmarks/.cache (self text takes minutes)."""
    path = os.path.join(CACHE, f"calibration_{name}_{NUM_SAMPLES}x{SEQ_LEN}_seed{SEED}.pt")
    if os.path.exists(path):
        return CalibrationData(**torch.load(path))
    if "no template" in name:  # what a model without a chat template gets: text continued from BOS
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = None
    calib = load_calibration(CALIBRATIONS[name], tokenizer, NUM_SAMPLES, SEQ_LEN, SEED, model=dense, batch_size=8,
                             progress=True)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(vars(calib), path)
    print(f"calibration {name}: {calib.source}, {calib.num_tokens} tokens, generated in "
          f"{calib.generation_seconds:.0f} s", flush=True)
    return calib


def reference(dense, tokenizer) -> DenseReference:
    path = os.path.join(CACHE, "reference")
    if os.path.isdir(path):
        return DenseReference.load(path)
    start = time.perf_counter()
    ref = DenseReference.compute(dense, tokenizer, "wikitext2-test-local", progress=True, **EVAL)
    ref.save(path)
    print(f"dense reference in {time.perf_counter() - start:.0f} s: perplexity {ref.meta['dense_perplexity']:.2f}, "
          f"top-64 tail mass {ref.meta['dense_tail_text']:.4f} (text) {ref.meta['dense_tail_chat']:.4f} (chat), "
          f"empty replies {ref.meta['dense_empty_reply_share']:.0%}", flush=True)
    return ref


def run_row(key: dict, dense, tokenizer, ref: DenseReference) -> dict:
    calib = calibration(key["calibration"], dense, tokenizer)
    start = time.perf_counter()
    result = hf_snp.prune(copy.deepcopy(dense), tokenizer, method=key["method"], sparsity=key["sparsity"],
                          targets=key["targets"].split(","), calibration=calib, batch_size=8, progress=False)
    seconds = time.perf_counter() - start
    metrics = compare(result.model, ref, tokenizer)
    return {**metrics, "params": result.report["params_after"], "prune_s": seconds,
            "generation_s": calib.generation_seconds, "commit": code_commit()}


BOUND_KEY = {"check": "top-k KL against the full KL", "method": "snp", "targets": "mlp", "sparsity": 0.3,
             "calibration": "wikitext", "windows": 4}
BOUND_KS = (16, 64, 256, 1024)


@torch.no_grad()
def bound_check(dense, tokenizer, ref: DenseReference) -> dict:
    """Top-k KL (k in BOUND_KS) against the exact KL over the whole vocabulary, and the dense tail mass, on the
    first text windows of the reference, for SNP at 30% of MLP with WikiText calibration."""
    calib = calibration(BOUND_KEY["calibration"], dense, tokenizer)
    pruned = hf_snp.prune(copy.deepcopy(dense), tokenizer, method="snp", sparsity=BOUND_KEY["sparsity"],
                          targets=["mlp"], calibration=calib, batch_size=8, progress=False).model
    sums = {"full": 0.0, **{f"top{k}": 0.0 for k in BOUND_KS}, **{f"tail{k}": 0.0 for k in BOUND_KS}}
    count = 0
    for window in ref.text_ids[: BOUND_KEY["windows"]]:
        p, q = (m(input_ids=window[None], use_cache=False).logits[0, :-1].float() for m in (dense, pruned))
        sums["full"] += float(kl_full(p, q).sum())
        for k in BOUND_KS:
            top = TopK.of(p, k)
            sums[f"top{k}"] += float(kl_topk(top, q).sum())
            sums[f"tail{k}"] += float(top.tail_mass().sum())
        count += p.shape[0]
    return {name: value / count for name, value in sums.items()} | {"positions": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="stop after this many new rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--bound-check", action="store_true", help="measure the top-k KL against the full KL first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = demo_model_source()
    tokenizer, dense = load_tokenizer(source), load_model(source, dtype=torch.float32)
    ref = reference(dense, tokenizer)
    protocol = {"calibration": f"{NUM_SAMPLES}x{SEQ_LEN} seed {SEED}", **EVAL, "prompts": len(ref.prompts),
                "dense": round(ref.meta["dense_perplexity"], 4)}
    cache = RowCache(os.path.join(RESULTS, "chat.jsonl"), protocol)
    dense_params, new = hf_snp.count_parameters(dense), 0
    if args.bound_check and cache.get(BOUND_KEY) is None:
        cache.put(BOUND_KEY, bound_check(dense, tokenizer, ref))
    for key in grid():
        if cache.get(key) is None:
            if args.limit is not None and new >= args.limit:
                break
            row = run_row(key, dense, tokenizer, ref)
            cache.put(key, row)
            new += 1
            print(f"{key}: ppl {row['perplexity_text']:.2f} kl_text {row['kl_text']:.3f} kl_chat {row['kl_chat']:.3f} "
                  f"empty {row['empty_reply_share']:.0%} ({row['prune_s']:.0f} s)", flush=True)
    write(cache, ref, dense_params)  # at the end only: docs/results.md copies chat.md (benchmarks/readme_results.py)


ORDER = list(CALIBRATIONS)
HEADER = ("| method | targets | sparsity | calibration | WikiText ppl | KL text | agree text | KL chat | agree chat "
          "| empty replies | parameters | prune s | generation s | timed at |")


def finished(cache: RowCache) -> list[tuple[dict, dict]]:
    rows = [(key, row) for key in grid() if (row := cache.get(key)) is not None]
    return sorted(rows, key=lambda kr: (kr[0]["targets"], kr[0]["sparsity"], kr[0]["method"],
                                        ORDER.index(kr[0]["calibration"])))


def table(rows: list[tuple[dict, dict]], ref: DenseReference, dense_params: int) -> list[str]:
    meta = ref.meta
    lines = [HEADER, "| ---" * 4 + "| ---:" * 10 + " |",
             f"| dense | - | 0% | - | {meta['dense_perplexity']:.2f} | 0 | 1 | 0 | 1 | "
             f"{meta['dense_empty_reply_share']:.0%} | {dense_params:,} | - | - | - |"]
    for key, row in rows:
        lines.append(f"| {key['method']} | {key['targets']} | {key['sparsity']:.0%} | {key['calibration']} | "
                     f"{row['perplexity_text']:.2f} | {row['kl_text']:.3f} | {row['agreement_text']:.3f} | "
                     f"{row['kl_chat']:.3f} | {row['agreement_chat']:.3f} | {row['empty_reply_share']:.0%} | "
                     f"{row['params']:,} | {row['prune_s']:.0f} | {row['generation_s']:.0f} | {row['commit']} |")
    return lines


def targets_check(rows: list[tuple[dict, dict]]) -> list[str]:
    """The issue's targets for each calibration, against WikiText calibration (SNP, MLP)."""
    found = {(k["method"], k["targets"], k["sparsity"], k["calibration"]): r for k, r in rows}
    base = found.get(("snp", "mlp", 0.3, "wikitext"))
    lines = ["| calibration | empty at 30% | chat KL vs wikitext at 30% | ppl vs wikitext at 30% | empty at 50% "
             "| SNP chat KL at or below VBP and FLAP (30%, 50%) |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name in ORDER:
        at30, at50 = found.get(("snp", "mlp", 0.3, name)), found.get(("snp", "mlp", 0.5, name))
        if at30 is None or base is None:
            continue
        ranks = []
        for sparsity in (0.3, 0.5):
            snp, others = found.get(("snp", "mlp", sparsity, name)), [
                found.get((m, "mlp", sparsity, name)) for m in ("vbp", "flap")]
            if snp is not None and all(o is not None for o in others):
                ranks.append("yes" if snp["kl_chat"] <= min(o["kl_chat"] for o in others) else "no")
        lines.append(f"| {name} | {at30['empty_reply_share']:.0%} | {base['kl_chat'] / at30['kl_chat']:.2f}x lower | "
                     f"{at30['perplexity_text'] / base['perplexity_text'] - 1:+.1%} | "
                     f"{'-' if at50 is None else format(at50['empty_reply_share'], '.0%')} | "
                     f"{', '.join(ranks) or '-'} |")
    return lines


def bound_lines(check: dict | None) -> list[str]:
    if check is None:
        return []
    lines = ["## How far the top-k KL is from the full KL", "",
             f"SNP, 30% of MLP, WikiText calibration, on the first {BOUND_KEY['windows']} text windows "
             f"({check['positions']} positions): the exact KL over the whole vocabulary is {check['full']:.4f} nats "
             "per token.", "", "| k | top-k KL | share of the full KL | dense tail mass |",
             "| ---: | ---: | ---: | ---: |"]
    for k in BOUND_KS:
        lines.append(f"| {k} | {check[f'top{k}']:.4f} | {check[f'top{k}'] / check['full']:.1%} | "
                     f"{check[f'tail{k}']:.4f} |")
    return lines + [""]


def replies(rows: list[tuple[dict, dict]], ref: DenseReference) -> list[str]:
    lines = []
    for key, row in rows:
        if key["method"] == "snp" and key["targets"] == "mlp" and key["sparsity"] == 0.3:
            lines += ["", f"SNP, 30% of MLP, calibration {key['calibration']}:", ""]
            for shown in row["replies"]:
                lines += [f"* **{shown['prompt']}**", f"  * dense: {shown['dense']!r}",
                          f"  * pruned: {shown['pruned']!r}"]
    return lines


def write(cache: RowCache, ref: DenseReference, dense_params: int) -> None:
    rows = finished(cache)
    meta = ref.meta
    lines = ["# chat: SmolLM2-135M-Instruct, calibration for chat models", "",
             __doc__.split("\n\n")[2].replace("\n", " "), "",
             f"Dense model: WikiText perplexity {meta['dense_perplexity']:.2f}; the dense top-64 leaves "
             f"{meta['dense_tail_text']:.4f} of the probability mass in the tail on text and "
             f"{meta['dense_tail_chat']:.4f} on chat replies (the top-k KL is a lower bound of the full KL, short "
             "of it by that mass times the tail's own divergence); the dense model answers "
             f"{1 - meta['dense_empty_reply_share']:.0%} of the prompts.", "",
             "Regenerate: `python benchmarks/chat.py` (resumable; `--limit N` runs at most N new rows). Seconds were "
             "taken on a shared 2-core CPU machine (other jobs running, 1 torch thread): compare them only "
             "roughly; `generation s` is the time the dense model took to write the calibration text (once per "
             "source, reused by every row).", "", *table(rows, ref, dense_params), "",
             "## Targets", "",
             "With the default for chat models (`self+wikitext 3:1`, in hf_snp "
             "`{\"self\": 0.75, \"wikitext2\": 0.25}`), SNP at 30% of MLP should answer every prompt, have a "
             "chat KL at least 2x lower than with WikiText calibration and a WikiText perplexity at most 10% above "
             "it; at 50% fewer than 10% empty replies; SNP at or below VBP and FLAP on chat KL at 30% and 50% (same "
             "calibration). Per calibration:", "",
             *targets_check(rows), "", *bound_lines(cache.get(BOUND_KEY)),
             "## Replies side by side", *replies(rows, ref)]
    with open(os.path.join(RESULTS, "chat.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    plot(rows, ref)


def plot(rows: list[tuple[dict, dict]], ref: DenseReference) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("kl_chat", "KL(dense || pruned), chat replies"), ("empty_reply_share", "empty replies"),
              ("perplexity_text", "WikiText-2 perplexity"))
    for ax, (metric, label) in zip(axes, panels):
        for method in ("snp", "vbp", "flap"):
            for name in ORDER:
                points = sorted((k["sparsity"], r[metric]) for k, r in rows
                                if k["method"] == method and k["targets"] == "mlp" and k["calibration"] == name)
                if points:
                    ax.plot(*zip(*points), marker="o", linestyle={"snp": "-", "vbp": "--", "flap": ":"}[method],
                            color=f"C{ORDER.index(name)}", label=f"{method}, {name}")
        ax.set_xlabel("sparsity of MLP neurons")
        ax.set_title(label)
    axes[2].axhline(ref.meta["dense_perplexity"], color="grey", linestyle="--", label="dense")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct pruned by calibration data (benchmarks/chat.py)")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "chat.png"), dpi=110)


if __name__ == "__main__":
    main()
