"""The output directory, checked before any long work: a non-empty one is refused unless overwriting."""

from __future__ import annotations

import os


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite`` (checked before any long work)."""
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"output directory {output_dir!r} exists and is not empty; pass overwrite=True "
                              "(--overwrite) or choose another")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"output path {output_dir!r} exists and is not a directory")
