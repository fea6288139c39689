"""The save format (DESIGN.md section 4): stock class when it can hold the result, hf_snp type otherwise.

Writes go to a temporary directory beside the target, renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from transformers import PreTrainedModel

from .adapters import ModelAdapter
from .model_card import model_card
from .models import HF_SNP_TYPES, hf_snp_class_for
from .report import REPORT_NAME, PruneReport



def base_model_type(model_type: str) -> str:
    return model_type.removeprefix("hf_snp_")


SPEC_KEYS = {  # report field -> hf_snp_layers key
    "mlp_width": "intermediate_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}
BIAS_KEYS = {"mlp_output_bias_added": "mlp_output_bias", "attention_output_bias_added": "attention_output_bias"}


def layer_specs(records: list[dict], previous: list[dict]) -> list[dict]:
    """hf_snp_layers entries: the previous spec updated with each layer's new shapes and biases."""
    specs = []
    for record, old in zip(records, previous):
        spec = dict(old)
        spec.update({key: record[field] for field, key in SPEC_KEYS.items() if field in record})
        spec.update({key: True for field, key in BIAS_KEYS.items() if record.get(field)})
        specs.append(spec)
    return specs


def _uniform(specs: list[dict], key: str):
    values = {spec.get(key) for spec in specs}
    return values.pop() if len(values) == 1 else None


def finalize_architecture(model: PreTrainedModel, adapter: ModelAdapter, records: list[dict]) -> str:
    """Update the config to the pruned shapes; returns "stock" or "hf_snp" (the class it now is)."""
    config = model.config
    previous = list(getattr(config, "hf_snp_layers", None) or [{} for _ in records])
    specs = layer_specs(records, previous)
    width, heads, kv_heads = (_uniform(specs, key) for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads"))
    heads_changed = any("num_attention_heads" in spec for spec in specs) and heads != config.num_attention_heads
    stock = (
        all(_uniform(specs, key) is not None or not any(key in s for s in specs) for key in SPEC_KEYS.values())
        and not any(spec.get(key) for spec in specs for key in BIAS_KEYS.values())
        and (not heads_changed or (adapter.stock_head_pruning and heads and kv_heads))
    )
    if stock:
        if hasattr(config, "hf_snp_layers"):
            config.hf_snp_layers = None  # an hf_snp model that became uniform again
        if width is not None:
            adapter.set_uniform_mlp_width(config, width)
        if heads_changed:
            adapter.set_uniform_heads(config, heads, kv_heads)
        return "hf_snp" if config.model_type.startswith("hf_snp_") else "stock"
    config_cls = HF_SNP_TYPES[base_model_type(config.model_type)][0]
    model_cls = hf_snp_class_for(model)
    if getattr(config, "head_dim", "absent") is None:  # per-layer heads keep the original head_dim
        config.head_dim = adapter.head_dim(config)
    config.__class__ = config_cls  # a subclass of the stock config: every field stays valid
    config.hf_snp_layers = specs
    config.architectures = [model_cls.__name__]
    model.__class__ = model_cls  # a subclass that only differs in how __init__ sizes the layers
    return "hf_snp"


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite`` (checked before any long work)."""
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"output directory {output_dir!r} exists and is not empty; pass overwrite=True (--overwrite) or choose another")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"output path {output_dir!r} exists and is not a directory")


def save_pruned(model: PreTrainedModel, tokenizer, report: dict, output_dir: str, overwrite: bool = False,
                image_processor=None) -> None:
    """Save weights (safetensors), config, code files of an hf_snp type, tokenizer or image processor,
    and the report, atomically."""
    prepare_output_dir(output_dir, overwrite)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".hf_snp_tmp_", dir=parent)
    try:
        model.save_pretrained(staging)
        for preprocessor in (tokenizer, image_processor):
            if preprocessor is not None:
                preprocessor.save_pretrained(staging)
        with open(os.path.join(staging, REPORT_NAME), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(model_card(PruneReport(report)))
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(prefix=".hf_snp_old_", dir=parent)
            os.replace(output_dir, os.path.join(old, "previous"))
            os.replace(staging, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
