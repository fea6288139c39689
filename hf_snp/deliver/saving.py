"""Saving a pruned model: its architecture fixed to the pruned shapes, then weights, tokenizer, report and card.

Writes go to a temporary directory beside the target, renamed into place when complete; the files get
the modes of ordinary files (0644 and folders 0755 under the usual umask), not the temporary directory's 0700.
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

# config attributes that describe where the weights were read from, not the pruned model: GGUF's general.name
SOURCE_ONLY_CONFIG = ("_model_name_or_path",)


def save_pruned(model: PreTrainedModel, tokenizer, report: dict, output_dir: str, overwrite: bool = False,
                image_processor=None) -> None:
    """Save weights (safetensors), config, code files of an hf_snp type, tokenizer or image processor,
    the report and the model card, atomically."""
    prepare_output_dir(output_dir, overwrite)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".hf_snp_tmp_", dir=parent)
    try:
        _save_model(model, staging)
        for preprocessor in (tokenizer, image_processor):
            if preprocessor is not None:
                preprocessor.save_pretrained(staging)
        with open(os.path.join(staging, REPORT_NAME), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(model_card(PruneReport(report), folder=os.path.basename(os.path.abspath(output_dir))))
        ordinary_modes(staging)
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


def _save_model(model: PreTrainedModel, folder: str) -> None:
    """``save_pretrained`` without the config attributes that only describe the source (put back afterwards)."""
    kept = {name: model.config.__dict__.pop(name) for name in SOURCE_ONLY_CONFIG if name in model.config.__dict__}
    try:
        model.save_pretrained(folder)
    finally:
        model.config.__dict__.update(kept)


def ordinary_modes(folder: str) -> None:
    """Give ``folder`` and everything in it the modes new files and folders get here (0666 / 0777 less the umask):
    temporary files and directories are created private (0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
