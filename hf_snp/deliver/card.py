"""The model card (README.md with YAML metadata) written beside every pruned checkpoint.

Front matter as the Hub reads it (base_model, base_model_relation, license, library_name, pipeline_tag,
tags), a title naming the source model and the change, the run's numbers, the quality measured (the
report's ``metrics``: perplexity, and the dense-reference metrics when present), and how to load it.
"""

from __future__ import annotations

from typing import Any

from ..adapters.base import adapter_for_type
from ..setup.loading import looks_like_hub_id
from .report import PruneReport

CARD_MARKER = "The full pruning report (per-layer widths, timings) is in `hf_snp_report.json`."

METHOD_NAMES = {
    "snp": "SNP (Subspace Node Pruning, arXiv 2405.17506)",
    "vbp": "VBP (Variance-Based Pruning, arXiv 2507.12988)",
    "random": "random pruning (baseline)",
}
METHOD_SHORT = {"snp": "SNP", "vbp": "VBP", "flap": "FLAP", "wanda_sp": "Wanda-SP", "magnitude": "magnitude pruning",
                "random": "random pruning"}
TARGET_NAMES = {"mlp": "MLP neurons", "heads": "attention heads", "experts": "experts",
                "blocks": "the decoder layers' parameters"}
# metrics measured against the dense model (filled by evaluation when asked): label, format
REFERENCE_METRICS = {
    "kl_text": ("KL divergence to the dense model, text (nats per token)", "{:.4f}"),
    "agreement_text": ("top-1 agreement with the dense model, text", "{:.1%}"),
    "kl_chat": ("KL divergence to the dense model, chat replies (nats per token)", "{:.4f}"),
    "agreement_chat": ("top-1 agreement with the dense model, chat replies", "{:.1%}"),
    "empty_reply_share": ("share of empty chat replies", "{:.1%}"),
}
WIDTH_ROWS = (("intermediate_size", "MLP width"), ("num_attention_heads", "query heads"),
              ("num_key_value_heads", "KV heads"), ("expert_intermediate_size", "expert width"),
              ("num_experts", "experts"), ("shared_expert_intermediate_size", "shared expert width"))


def _compact_widths(report: PruneReport, field: str) -> str | None:
    values = [getattr(after, field) for _, _, after in report.layer_shapes() if getattr(after, field) is not None]
    if not values:
        return None
    if len(set(values)) == 1:
        return f"{values[0]} in every layer"
    return ", ".join(str(v) for v in values)


def speed_summary(speed: dict | None) -> str | None:
    """"prefill 1.21x (batch 1), 1.30x (batch 8), decode 1.25x on <device>, <dtype>" from a speed probe."""
    if not speed or not speed.get("prefill_speedup"):
        return None
    prefill = ", ".join(f"{value:.2f}x (batch {batch[1:]})" for batch, value in speed["prefill_speedup"].items()
                        if value is not None)
    decode = speed.get("decode_speedup")
    return (f"prefill {prefill}" + (f", decode {decode:.2f}x" if decode else "")
            + f" on {speed.get('device')}, {speed.get('dtype', '').removeprefix('torch.')}")


def change_summary(report: PruneReport) -> str:
    """What was removed, e.g. "30% of MLP neurons removed with SNP" or "30% of MLP neurons and 10% of attention
    heads removed with VBP"."""
    targets = list(report.get("targets") or ["mlp"])
    per_target = report.get("sparsity_per_target") or {}
    sparsity = report.get("sparsity", 0)
    if "blocks" in targets:
        what = f"{sparsity:.0%} of {TARGET_NAMES['blocks']}"
    elif per_target:
        what = " and ".join(f"{per_target.get(t, sparsity):.0%} of {TARGET_NAMES.get(t, t)}" for t in targets)
    else:
        what = f"{sparsity:.0%} of " + " and ".join(TARGET_NAMES.get(t, t) for t in targets)
    if report.get("layer_sparsity"):
        what += " (per-layer budgets)"
    method = report.get("method", "")
    return f"{what} removed with {METHOD_SHORT.get(method, method)}"


def _front_matter(report: PruneReport, pipeline: str) -> list[str]:
    base = report.get("base_model")
    lines = ["---"]
    if looks_like_hub_id(base):
        lines += [f"base_model: {base}", "base_model_relation: pruned"]
    if report.get("license"):
        lines.append(f"license: {report['license']}")
    lines += ["library_name: transformers", f"pipeline_tag: {pipeline}",
              "tags:", "- hf_snp", "- pruning", "- structured-pruning", f"- {report.get('method', '')}", "---", ""]
    return lines


def _summary_rows(report: PruneReport) -> list[str]:
    rows = ["| | |", "| --- | --- |",
            f"| targets | {', '.join(report.get('targets', []))} |",
            f"| sparsity | {report.get('sparsity', 0):.0%} of the targeted parameters |",
            f"| parameters | {report.get('params_before', 0):,} -> {report.get('params_after', 0):,} |",
            f"| calibration | {report.get('calibration')} |"]
    rows += [f"| {label} | {widths} |" for field, label in WIDTH_ROWS if (widths := _compact_widths(report, field))]
    quantization = report.get("quantization")
    if quantization:
        rows.append(f"| quantization | {quantization['scheme']} ({quantization['library']}), weights "
                    f"{quantization['weight_bytes_before'] / 2**20:,.1f} MiB -> "
                    f"{quantization['weight_bytes_after'] / 2**20:,.1f} MiB |")
    speed = speed_summary(report.get("speed"))
    if speed:
        rows.append(f"| speed-up | {speed} |")
    return rows


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "; ".join(f"{key} {_format(item)}" for key, item in value.items())
    return str(value)


def quality_lines(metrics: dict) -> list[str]:
    """The report's metrics as a table and protocol sentences: perplexity dense -> pruned, the metrics against
    the dense model (KL, top-1 agreement, empty replies) when present, then any other metric by name."""
    rows, notes, shown = [], [], set()
    if "perplexity_before" in metrics and "perplexity_after" in metrics:
        rows.append(f"| perplexity, dense -> pruned | {metrics['perplexity_before']:.2f} -> "
                    f"{metrics['perplexity_after']:.2f} |")
        shown |= {"perplexity_before", "perplexity_after"}
    for key, (label, form) in REFERENCE_METRICS.items():
        if isinstance(metrics.get(key), (int, float)):
            rows.append(f"| {label} | {form.format(metrics[key])} |")
            shown.add(key)
    for key, value in metrics.items():
        if key.endswith("_protocol"):
            notes.append(f"{key.removesuffix('_protocol').replace('_', ' ').capitalize()} measured on {value}.")
        elif key not in shown:
            rows.append(f"| {key.replace('_', ' ')} | {_format(value)} |")
    if not rows:
        return []
    return ["", "## Quality", "", "| | |", "| --- | --- |", *rows, *([""] + notes if notes else [])]


def _load_lines(report: PruneReport, auto: str, preprocessor: str, repo_id: str | None,
                folder: str | None) -> list[str]:
    stock = report.get("save_format") == "stock"
    load = f"{auto}.from_pretrained(repo)" if stock else f"{auto}.from_pretrained(repo, trust_remote_code=True)"
    where = (repr(repo_id) if repo_id else f"{folder or '.'!r}  # this folder; after `hf-snp push`, 'user/name'")
    preprocessor_name = "image_processor" if preprocessor == "AutoImageProcessor" else "tokenizer"
    return ["", "## How to load", "", "```python", f"from transformers import {auto}, {preprocessor}",
            f"repo = {where}", f"model = {load}", f"{preprocessor_name} = {preprocessor}.from_pretrained(repo)",
            "```", "",
            *(["Its linear layers are quantized with torchao: `pip install torchao` to load it.", ""]
              if report.get("quantization") else []),
            "It is a stock transformers checkpoint: every tool that knows the architecture loads it." if stock else
            "Its layers have different widths, so it uses hf_snp's model type: the code file travels with the "
            "checkpoint (`trust_remote_code=True`), or `import hf_snp` first and drop `trust_remote_code`.",
            "", CARD_MARKER, ""]


def model_card(report: PruneReport, repo_id: str | None = None, folder: str | None = None) -> str:
    """README.md text: YAML front matter, a title naming the source model and the change, the numbers, the
    quality measured and how to load it (from ``repo_id`` after a push, else from ``folder``)."""
    base = report.get("base_model")
    name = report.get("model_name") or base or report.get("model_type", "model")
    adapter = adapter_for_type(report["model_type"]) if report.get("model_type") else None  # partial: a causal LM
    image = adapter is not None and adapter.modality == "image"
    auto = adapter.auto_class if adapter is not None else "AutoModelForCausalLM"
    source = f"[{base}](https://huggingface.co/{base})" if looks_like_hub_id(base) else name
    method = report.get("method", "")
    body = [f"# {name.rsplit('/', 1)[-1]}, {change_summary(report)}", "",
            f"This model is {source} pruned in one shot, without retraining, by "
            f"hf_snp with {METHOD_NAMES.get(method, METHOD_SHORT.get(method, method))}.",
            "", *_summary_rows(report), *quality_lines(report.get("metrics") or {})]
    return "\n".join(_front_matter(report, "image-classification" if image else "text-generation") + body +
                     _load_lines(report, auto, "AutoImageProcessor" if image else "AutoTokenizer", repo_id, folder))
