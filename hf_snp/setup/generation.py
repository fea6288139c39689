"""Batched generation from token prompts of different lengths (left-padded), cut at the first turn-ending token."""

from __future__ import annotations

from typing import Any

import torch


def model_device(model: Any) -> torch.device:
    """Where the model's inputs go (the input embedding's device; CPU when it is offloaded)."""
    weight = next(model.get_input_embeddings().parameters())
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask with every prompt ending at the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids, mask


def cut_at_stop(tokens: list[int], stop: set[int]) -> list[int]:
    """The tokens up to and including the first stop token."""
    for position, token in enumerate(tokens):
        if token in stop:
            return tokens[: position + 1]
    return tokens


@torch.no_grad()
def generate(model: Any, prompts: list[list[int]], max_new_tokens: int, stop: list[int], pad_id: int,
             sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> list[list[int]]:
    """Each prompt's new tokens (greedy, or sampled from the global torch RNG), ending at the first stop token
    (kept) or after ``max_new_tokens``."""
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    ids, mask = left_padded(prompts, pad_id)
    device = model_device(model)
    options: dict[str, Any] = {"do_sample": sample}
    if sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         min_new_tokens=0, eos_token_id=list(stop) or None, pad_token_id=pad_id,
                         num_beams=1, use_cache=True, **options)
    new = out[:, ids.shape[1]:].tolist()
    return [cut_at_stop(tokens, set(stop)) for tokens in new]
