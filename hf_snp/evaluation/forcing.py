"""Teacher-forced forward passes on held-out text windows and on chat replies, batch by batch, and greedy chat
replies. The dense reference and every comparison run the same batches, so that a model compared with itself
meets bit-identical logits."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from ..passes.placement import input_device
from ..setup.generation import generate


@torch.no_grad()
def text_logits(model: Any, ids: torch.Tensor, batch_size: int, progress: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits [B*(L-1), V] of positions 0..L-2, the next tokens [B*(L-1)]) per batch of windows ``ids`` [W, L]."""
    device = input_device(model)
    for start in tqdm(range(0, len(ids), batch_size), desc="Text windows", disable=not progress, leave=False):
        batch = ids[start : start + batch_size]
        logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1]
        yield logits.flatten(0, 1).float(), batch[:, 1:].flatten()


@torch.no_grad()
def reply_logits(model: Any, prompts: list[list[int]], replies: list[list[int]], batch_size: int, pad_id: int,
                 progress: bool = False) -> Iterator[torch.Tensor]:
    """Per batch, the logits [sum R, V] of the positions that predict each reply token, the prompt and reply
    teacher-forced (right-padded: the padding comes after every real token)."""
    device = input_device(model)
    for start in tqdm(range(0, len(prompts), batch_size), desc="Chat replies", disable=not progress, leave=False):
        sequences = [p + r for p, r in zip(prompts[start : start + batch_size], replies[start : start + batch_size])]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)], mask[row, : len(sequence)] = torch.tensor(sequence), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        parts = []
        for row, (prompt, reply) in enumerate(zip(prompts[start : start + batch_size],
                                                  replies[start : start + batch_size])):
            parts.append(logits[row, len(prompt) - 1 : len(prompt) + len(reply) - 1])
        yield torch.cat(parts).float()


def greedy_replies(model: Any, prompts: list[list[int]], max_new_tokens: int, stop: list[int], pad_id: int,
                   batch_size: int, progress: bool = False) -> list[list[int]]:
    """Each prompt's greedy reply, ending with the stop token when one came within ``max_new_tokens``."""
    replies: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="Greedy replies", disable=not progress, leave=False):
        replies += generate(model, prompts[start : start + batch_size], max_new_tokens, stop, pad_id)
    return replies
