"""Calibration data: any of the accepted forms -> a [N, L] token tensor with its attention mask.

Text sources are joined, tokenized once, and N windows of L tokens are drawn at seeded random
offsets (the GPTQ / Wanda protocol). Hub names go through ``datasets``; where the Hub cannot be
reached, ``wikitext2`` falls back to the WikiText-2 validation text packaged with hf_snp.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

import torch

from .datasets import load_hub_dataset

logger = logging.getLogger("hf_snp")

# name -> (path, config, split, column, data_files); c4 reads one validation shard, as SparseGPT does
HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text", None),
    "c4": ("allenai/c4", None, "validation", "text", {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
}
PACKAGED = {"wikitext2-local": "wiki.valid.tokens", "wikitext2-test-local": "wiki.test.raw"}


class CalibrationError(ValueError):
    """The calibration data cannot give the requested samples."""


@dataclass
class CalibrationData:
    """Token windows for calibration; ``attention_mask`` marks real (non-padding) tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def model_batches(self, batch_size: int):
        """(forward kwargs, token mask) per batch; the mask is None when no token is padding."""
        for start in range(0, self.num_samples, batch_size):
            ids, mask = self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size]
            yield ({"input_ids": ids, "attention_mask": mask, "use_cache": False},
                   None if bool(mask.all()) else mask.bool().flatten())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask

    def select(self, indices: list[int]) -> "CalibrationData":
        """These windows only (a held-out split)."""
        return dataclasses.replace(self, input_ids=self.input_ids[indices], attention_mask=self.attention_mask[indices])


def packaged_text(name: str = "wikitext2-local") -> str:
    """Text shipped with hf_snp: ``wikitext2-local`` (validation) or ``wikitext2-test-local``."""
    return resources.files("hf_snp").joinpath("data", "wikitext-2", PACKAGED[name]).read_text(encoding="utf-8")


def _hub_texts(name: str) -> list[str]:
    path, config, split, column, data_files = HUB_DATASETS[name]
    try:
        data = load_hub_dataset(path, config, split, data_files)
    except Exception as error:  # noqa: BLE001  (offline, or the Hub refused)
        if name == "wikitext2":
            logger.warning("could not load %s from the Hub (%s); using the packaged WikiText-2 validation text",
                           name, type(error).__name__)
            return [packaged_text("wikitext2-local")]
        raise CalibrationError(f"could not load calibration dataset {name!r} from the Hub: {error}. "
                               "Pass a local .txt/.jsonl path, a list of strings or a token tensor instead.") from error
    return list(data[column])


def _file_texts(path: str) -> list[str]:
    if path.endswith((".jsonl", ".json")):
        texts = []
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if isinstance(record, dict):
                    if "text" not in record:
                        raise CalibrationError(f"{path}:{line_no}: a JSONL record needs a 'text' field")
                    record = record["text"]
                texts.append(str(record))
        return texts
    with open(path, encoding="utf-8") as handle:
        return [handle.read()]


def _dataset_texts(data: Any) -> list[str]:
    columns = data.column_names
    column = "text" if "text" in columns else next((c for c in columns if isinstance(data[0][c], str)), None)
    if column is None:
        raise CalibrationError(f"the calibration dataset has no text column (columns: {columns})")
    return list(data[column])


def resolve_texts(spec: Any) -> tuple[list[str], str]:
    """Texts and a short description for a text-like calibration spec."""
    if isinstance(spec, str):
        if spec in HUB_DATASETS:
            return _hub_texts(spec), spec
        if spec in PACKAGED:
            return [packaged_text(spec)], spec
        if os.path.isdir(spec):
            raise CalibrationError(f"calibration {spec!r} is a folder without images; give a .txt/.jsonl file for text")
        if os.path.exists(spec):
            return _file_texts(spec), os.path.basename(spec)
        raise CalibrationError(
            f"calibration {spec!r} is neither a known dataset ({sorted([*HUB_DATASETS, *PACKAGED])}) "
            "nor an existing file"
        )
    if isinstance(spec, Sequence) and all(isinstance(item, str) for item in spec):
        return list(spec), f"list of {len(spec)} texts"
    if hasattr(spec, "column_names"):
        return _dataset_texts(spec), "datasets.Dataset"
    raise CalibrationError(
        f"unsupported calibration of type {type(spec).__name__}: give a dataset name, a .txt/.jsonl path, "
        "a list of strings, a datasets.Dataset, or a LongTensor [N, L] of token ids"
    )


def _from_tensor(ids: torch.Tensor, mask: torch.Tensor | None) -> CalibrationData:
    if ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64) or ids.dim() != 2:
        raise CalibrationError(f"a calibration tensor must be a LongTensor [N, L] of token ids; "
                               f"got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise CalibrationError("the calibration tensor is empty")
    mask = torch.ones_like(ids) if mask is None else mask
    if mask.shape != ids.shape:
        raise CalibrationError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    return CalibrationData(ids.long(), mask.long(), f"tensor {tuple(ids.shape)}")


def is_text_calibration(spec: Any) -> bool:
    """True when ``spec`` must be tokenized (anything but token tensors)."""
    return not (isinstance(spec, (torch.Tensor, CalibrationData)) or (isinstance(spec, dict) and "input_ids" in spec))


def load_calibration(spec: Any, tokenizer, num_samples: int, seq_len: int, seed: int = 0) -> CalibrationData:
    """Turn ``spec`` into ``num_samples`` windows of ``seq_len`` tokens (token tensors are used as given)."""
    if isinstance(spec, CalibrationData):
        return spec
    if isinstance(spec, torch.Tensor):
        return _from_tensor(spec, None)
    if isinstance(spec, dict) and "input_ids" in spec:
        return _from_tensor(torch.as_tensor(spec["input_ids"]),
                            None if spec.get("attention_mask") is None else torch.as_tensor(spec["attention_mask"]))
    texts, source = resolve_texts(spec)
    text = "\n\n".join(t for t in texts if t and t.strip())
    if not text:
        raise CalibrationError(f"calibration data {source!r} is empty")
    if tokenizer is None:
        raise CalibrationError("text calibration needs a tokenizer; pass tokenizer=... or a token tensor")
    stream = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    if len(stream) < seq_len:
        raise CalibrationError(
            f"calibration data {source!r} has {len(stream)} tokens, fewer than seq_len={seq_len}: "
            "give more text or a smaller seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (num_samples,), generator=generator)
    ids = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
    return CalibrationData(ids, torch.ones_like(ids), f"{source}: {num_samples} x {seq_len} tokens, seed {seed}")
