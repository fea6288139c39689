"""Calibration data: any of the accepted forms -> a [N, L] token tensor with its attention mask.

Text sources are joined, tokenized once, and N windows of L tokens are drawn at seeded random
offsets (the GPTQ / Wanda protocol). Hub names go through ``datasets``; where the Hub cannot be
reached, ``wikitext2`` falls back to the WikiText-2 validation text packaged with hf_snp.
Conversations are rendered with the tokenizer's chat template and packed (windows start at
conversation starts) or padded (one conversation per window, the mask marks real tokens);
``"self"`` is text the model writes itself (it needs the loaded model); a dict ``{source: share}``
or a list of source names mixes sources, each giving its share of the windows.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from typing import Any, Sequence

import torch

from .calibration_data import CalibrationData, CalibrationError, concatenate
from .conversations import PACKAGED_CHAT, conversations_from, render
from .datasets import load_hub_dataset
from .self_calibration import self_calibration

__all__ = ["CalibrationData", "CalibrationError", "load_calibration", "needs_model", "packaged_text",
           "self_calibration"]

logger = logging.getLogger("hf_snp")

# name -> (path, config, split, column, data_files); c4 reads one validation shard, as SparseGPT does
HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text", None),
    "c4": ("allenai/c4", None, "validation", "text", {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
}
PACKAGED = {"wikitext2-local": "wiki.valid.tokens", "wikitext2-test-local": "wiki.test.raw"}
SELF = "self"
SOURCE_NAMES = (*HUB_DATASETS, *PACKAGED, *PACKAGED_CHAT, SELF)


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


def mixture_parts(spec: Any) -> list[tuple[Any, float]] | None:
    """(source, share) pairs for a mixture (a dict of shares, or a list of source names), else None."""
    if isinstance(spec, dict) and "input_ids" not in spec:
        parts = list(spec.items())
    elif (isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec)
          and all(s in SOURCE_NAMES for s in spec)):
        parts = [(name, 1.0) for name in spec]
    else:
        return None
    if not parts or any(not isinstance(share, (int, float)) or share <= 0 for _, share in parts):
        raise CalibrationError(f"a calibration mixture needs positive shares, got {spec!r}: e.g. "
                               "{'self': 0.5, 'wikitext2-local': 0.5}")
    total = sum(share for _, share in parts)
    return [(source, share / total) for source, share in parts]


def needs_model(spec: Any) -> bool:
    """True when the calibration is written by the model itself (``"self"``, alone or in a mixture): it can only
    be made after the weights load, with ``load_calibration(..., model=model)``."""
    if isinstance(spec, str):
        return spec == SELF
    parts = mixture_parts(spec) if isinstance(spec, (dict, list, tuple)) else None
    return parts is not None and any(needs_model(source) for source, _ in parts)


def window_counts(shares: list[float], num_samples: int) -> list[int]:
    """Windows per source: ``num_samples`` split by the shares (largest remainders), at least one each."""
    if num_samples < len(shares):
        raise CalibrationError(f"a mixture of {len(shares)} sources needs num_samples >= {len(shares)}")
    raw = [share * num_samples for share in shares]
    counts = [max(1, int(r)) for r in raw]
    for index in sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True):
        if sum(counts) >= num_samples:
            break
        counts[index] += 1
    while sum(counts) > num_samples:
        counts[counts.index(max(counts))] -= 1
    return counts


def load_calibration(spec: Any, tokenizer, num_samples: int, seq_len: int, seed: int = 0, *, model: Any = None,
                     batch_size: int = 8, progress: bool = False, pad_conversations: bool = False) -> CalibrationData:
    """Turn ``spec`` into ``num_samples`` windows of ``seq_len`` tokens (token tensors are used as given).

    ``model``: the loaded dense model, needed by ``"self"`` (see :func:`needs_model`), which generates on its
    device in batches of ``batch_size``; ``pad_conversations``: one conversation per window, padded, instead of
    packing them."""
    if isinstance(spec, CalibrationData):
        return spec
    if isinstance(spec, torch.Tensor):
        return _from_tensor(spec, None)
    if isinstance(spec, dict) and "input_ids" in spec:
        return _from_tensor(torch.as_tensor(spec["input_ids"]),
                            None if spec.get("attention_mask") is None else torch.as_tensor(spec["attention_mask"]))
    if spec == SELF:
        if model is None:
            raise CalibrationError("calibration='self' is written by the model itself: it is made after the weights "
                                   "load (load_calibration(..., model=model))")
        return self_calibration(model, tokenizer, num_samples, seq_len, seed, batch_size, progress)
    parts = mixture_parts(spec)
    if parts is not None:
        counts = window_counts([share for _, share in parts], num_samples)
        loaded = [load_calibration(source, tokenizer, count, seq_len, seed, model=model, batch_size=batch_size,
                                   progress=progress, pad_conversations=pad_conversations)
                  for (source, _), count in zip(parts, counts)]
        return concatenate(loaded, "mixture of " + " + ".join(part.source for part in loaded), seed)
    if tokenizer is None:
        raise CalibrationError("text calibration needs a tokenizer; pass tokenizer=... or a token tensor")
    found = conversations_from(spec)
    if found is not None:
        return conversation_windows(render(found[0], tokenizer), found[1], num_samples, seq_len, seed,
                                    _pad_id(tokenizer) if pad_conversations else None)
    return _text_windows(spec, tokenizer, num_samples, seq_len, seed)


def _text_windows(spec: Any, tokenizer, num_samples: int, seq_len: int, seed: int) -> CalibrationData:
    texts, source = resolve_texts(spec)
    text = "\n\n".join(t for t in texts if t and t.strip())
    if not text:
        raise CalibrationError(f"calibration data {source!r} is empty")
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


def _pad_id(tokenizer) -> int:
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    return 0


def conversation_windows(conversations: list[list[int]], source: str, num_samples: int, seq_len: int, seed: int,
                         pad_id: int | None = None) -> CalibrationData:
    """Windows of rendered conversations in a seeded order. Packed (``pad_id`` None): the conversations are joined
    into one stream (wrapping around) and each window starts at a conversation's start (at seeded offsets once
    every start is used). Padded: one conversation per window, cut at ``seq_len``, padded with ``pad_id`` after
    its end (the attention mask marks the real tokens)."""
    conversations = [c for c in conversations if c]
    if not conversations:
        raise CalibrationError(f"calibration conversations {source!r} are empty")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(conversations), generator=generator).tolist()
    if pad_id is not None:
        if len(conversations) < num_samples:
            raise CalibrationError(f"{source}: {len(conversations)} conversations for num_samples={num_samples} "
                                   "padded windows; give more conversations, a smaller num_samples, or pack them")
        ids = torch.full((num_samples, seq_len), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, index in enumerate(order[:num_samples]):
            tokens = conversations[index][:seq_len]
            ids[row, : len(tokens)], mask[row, : len(tokens)] = torch.tensor(tokens), 1
        return CalibrationData(ids, mask, f"{source} (chat template, padded): {num_samples} x {seq_len}, seed {seed}")
    stream, starts = [], []
    for index in order:
        starts.append(len(stream))
        stream += conversations[index]
    if len(stream) < seq_len:
        raise CalibrationError(f"calibration conversations {source!r} have {len(stream)} tokens, fewer than "
                               f"seq_len={seq_len}: give more conversations or a smaller seq_len")
    if num_samples > len(starts):
        starts += torch.randint(0, len(stream), (num_samples - len(starts),), generator=generator).tolist()
    wrapped = torch.tensor(stream + stream[:seq_len], dtype=torch.long)
    ids = torch.stack([wrapped[s : s + seq_len] for s in starts[:num_samples]])
    return CalibrationData(ids, torch.ones_like(ids), f"{source} (chat template, packed): {num_samples} x {seq_len} "
                           f"tokens, seed {seed}")
