"""Saving a pruned model: its architecture fixed to the pruned shapes, then weights, tokenizer, report and card.

Writes go to a temporary directory beside the target, renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from transformers import PreTrainedModel

from ..setup.output_dir import prepare_output_dir
from .card import model_card
from .report import REPORT_NAME, PruneReport


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
