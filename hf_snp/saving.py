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
from .engine import LayerRecord
from .models import CAUSAL_LM_TYPES

REPORT_NAME = "hf_snp_report.json"


def base_model_type(model_type: str) -> str:
    return model_type.removeprefix("hf_snp_")


def finalize_architecture(model: PreTrainedModel, adapter: ModelAdapter, records: list[LayerRecord]) -> str:
    """Update the config to the pruned shapes; returns "stock" or "hf_snp" (the class it now is)."""
    widths = [r.mlp_width for r in records]
    config = model.config
    previous = list(getattr(config, "hf_snp_layers", None) or [{} for _ in records])
    biased = [r.mlp_output_bias_added or bool(p.get("mlp_output_bias")) for r, p in zip(records, previous)]
    if len(set(widths)) == 1 and not any(biased):
        if hasattr(config, "hf_snp_layers"):
            config.hf_snp_layers = None  # an hf_snp model that became uniform again
        adapter.set_uniform_mlp_width(config, widths[0])
        return "hf_snp" if config.model_type.startswith("hf_snp_") else "stock"
    config_cls, model_cls = CAUSAL_LM_TYPES[base_model_type(config.model_type)]
    specs = []
    for p, width, bias in zip(previous, widths, biased):
        spec = {**p, "intermediate_size": width}
        if bias:
            spec["mlp_output_bias"] = True
        specs.append(spec)
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


def save_pruned(model: PreTrainedModel, tokenizer, report: dict, output_dir: str, overwrite: bool = False) -> None:
    """Save weights (safetensors), config, code files of an hf_snp type, tokenizer and report atomically."""
    prepare_output_dir(output_dir, overwrite)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".hf_snp_tmp_", dir=parent)
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, REPORT_NAME), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
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
