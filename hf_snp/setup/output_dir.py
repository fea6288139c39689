"""The output directory, checked before any long work: a non-empty one is refused unless overwriting, and even
then unless it holds a saved model (overwrite replaces the whole folder)."""

from __future__ import annotations

import os

SAVED_MODEL_FILES = ("config.json", "hf_snp_report.json")  # a folder holding one of these may be overwritten


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite`` (checked before any long work)."""
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"output directory {output_dir!r} exists and is not empty; pass overwrite=True "
                              "(--overwrite) or choose another")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"output path {output_dir!r} exists and is not a directory")
    if overwrite and os.path.isdir(output_dir) and os.listdir(output_dir) and not any(
            os.path.exists(os.path.join(output_dir, name)) for name in SAVED_MODEL_FILES):
        raise FileExistsError(f"overwrite would replace {output_dir!r}, which holds files but no saved model (no "
                              f"{' or '.join(SAVED_MODEL_FILES)}); choose a new or empty folder")
