"""Perplexity with the protocol of the pruning papers: non-overlapping windows over the joined test split."""

from __future__ import annotations

import logging
import math
import os

import torch
from tqdm.auto import tqdm

from ..passes.placement import input_device
from ..setup.calibration import packaged_text
from ..setup.datasets import load_hub_dataset

logger = logging.getLogger("hf_snp")

HUB_TEST_SETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text")}


def test_text(dataset: str) -> str:
    """The evaluation text: a file path, ``wikitext2`` (the Hub, else the packaged copy) or ``wikitext2-test-local``."""
    if os.path.exists(dataset):
        with open(dataset, encoding="utf-8") as handle:
            return handle.read()
    if dataset == "wikitext2-test-local":
        return packaged_text(dataset)
    if dataset in HUB_TEST_SETS:
        path, config, split, column = HUB_TEST_SETS[dataset]
        try:
            return "\n\n".join(load_hub_dataset(path, config, split)[column])
        except Exception as error:  # noqa: BLE001  (offline: the packaged test split is the same text)
            logger.warning("could not load %s from the Hub (%s); using the packaged WikiText-2 test text",
                           dataset, type(error).__name__)
            return packaged_text("wikitext2-test-local")
    raise ValueError(f"unknown evaluation dataset {dataset!r}: give a text file path or one of "
                     f"{[*HUB_TEST_SETS, 'wikitext2-test-local']}")


@torch.no_grad()
def perplexity(model, tokenizer, dataset: str = "wikitext2", seq_len: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> float:
    """exp(mean token NLL) over non-overlapping ``seq_len`` windows of the tokenized test text."""
    ids = tokenizer(test_text(dataset), return_tensors="pt").input_ids[0]
    windows = len(ids) // seq_len if max_windows is None else min(max_windows, len(ids) // seq_len)
    if windows == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    data = ids[: windows * seq_len].view(windows, seq_len)
    device = input_device(model)
    total, count = 0.0, 0
    for start in tqdm(range(0, windows, batch_size), desc="Perplexity", disable=not progress, leave=False):
        batch = data[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten().to(logits.device),
                                                 reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(total / count)
