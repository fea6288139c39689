"""The model card (README.md with YAML metadata) written beside every pruned checkpoint."""

from __future__ import annotations

from ..adapters.base import adapter_for_type
from ..setup.loading import looks_like_hub_id
from .report import PruneReport

CARD_MARKER = "The full pruning report (per-layer widths, timings) is in `hf_snp_report.json`."

METHOD_NAMES = {
    "snp": "SNP (Subspace Node Pruning, arXiv 2405.17506)",
    "vbp": "VBP (Variance-Based Pruning, arXiv 2507.12988)",
    "random": "random pruning (baseline)",
}


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


def model_card(report: PruneReport, repo_id: str | None = None) -> str:
    """README.md text: YAML front matter (base_model, library_name, tags) and a summary."""
    base = report.get("base_model")
    name = report.get("model_name") or base or report.get("model_type", "model")
    method = report.get("method", "")
    # a partial report (no model_type): a causal LM
    adapter = adapter_for_type(report["model_type"]) if report.get("model_type") else None
    image = adapter is not None and adapter.modality == "image"
    auto = adapter.auto_class if adapter is not None else "AutoModelForCausalLM"
    preprocessor = "AutoImageProcessor" if image else "AutoTokenizer"
    pipeline = "image-classification" if image else "text-generation"
    front = ["---", "library_name: transformers", f"pipeline_tag: {pipeline}"]
    if looks_like_hub_id(base):
        front.append(f"base_model: {base}")
    front += ["tags:", "- hf_snp", "- pruning", "- structured-pruning", f"- {method}", "---", ""]
    title = repo_id or f"{name} pruned with hf_snp"
    stock = report.get("save_format") == "stock"
    body = [
        f"# {title}",
        "",
        f"This model is {f'[{base}](https://huggingface.co/{base})' if looks_like_hub_id(base) else name} pruned "
        "in one shot, without retraining, by "
        f"hf_snp with {METHOD_NAMES.get(method, method)}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| targets | {', '.join(report.get('targets', []))} |",
        f"| sparsity | {report.get('sparsity', 0):.0%} of the targeted parameters |",
        f"| parameters | {report.get('params_before', 0):,} -> {report.get('params_after', 0):,} |",
        f"| calibration | {report.get('calibration')} |",
    ]
    for field, label in (("intermediate_size", "MLP width"), ("num_attention_heads", "query heads"),
                         ("num_key_value_heads", "KV heads"), ("expert_intermediate_size", "expert width"),
                         ("num_experts", "experts"), ("shared_expert_intermediate_size", "shared expert width")):
        widths = _compact_widths(report, field)
        if widths:
            body.append(f"| {label} | {widths} |")
    quantization = report.get("quantization")
    if quantization:
        body.append(f"| quantization | {quantization['scheme']} ({quantization['library']}), weights "
                    f"{quantization['weight_bytes_before'] / 2**20:,.1f} MiB -> "
                    f"{quantization['weight_bytes_after'] / 2**20:,.1f} MiB |")
    speed = speed_summary(report.get("speed"))
    if speed:
        body.append(f"| speed-up | {speed} |")
    for name, value in report.get("metrics", {}).items():
        body.append(f"| {name.replace('_', ' ')} | {value:.4g} |" if isinstance(value, float)
                    else f"| {name} | {value} |")
    load = f"{auto}.from_pretrained(repo)" if stock else f"{auto}.from_pretrained(repo, trust_remote_code=True)"
    body += [
        "",
        "## How to load",
        "",
        "```python",
        f"from transformers import {auto}, {preprocessor}",
        f"repo = {repo_id or 'PATH_OR_REPO'!r}",
        f"model = {load}",
        f"{'image_processor' if image else 'tokenizer'} = {preprocessor}.from_pretrained(repo)",
        "```",
        "",
        *(["Its linear layers are quantized with torchao: `pip install torchao` to load it.", ""]
          if quantization else []),
        "It is a stock transformers checkpoint: every tool that knows the architecture loads it."
        if stock else
        "Its layers have different widths, so it uses hf_snp's model type: the code file travels with the "
        "checkpoint (`trust_remote_code=True`), or `import hf_snp` first and drop `trust_remote_code`.",
        "",
        CARD_MARKER,
        "",
    ]
    return "\n".join(front + body)
