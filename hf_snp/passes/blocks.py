"""Whole-block pruning: score blocks by how little they change the residual stream, remove the most
redundant ones, and renumber what remains so the model (and its KV cache) stays consistent
(docs/design.md §7.1)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .. import parallel
from ..adapters.base import ModelAdapter


def choose_blocks(similarity: list[float], params: list[int], budget: float) -> list[int]:
    """The most input-preserving blocks (highest cosine first) whose total comes nearest the budget."""
    order = sorted(range(len(similarity)), key=lambda i: (-similarity[i], i))
    chosen, removed = [], 0
    for index in order[:-1]:  # at least one block stays
        if abs(removed + params[index] - budget) >= abs(removed - budget):
            break
        chosen.append(index)
        removed += params[index]
    return sorted(chosen)


def remove_blocks(model: PreTrainedModel, adapter: ModelAdapter, indices: list[int]) -> None:
    """Delete decoder blocks in place and fix the config's per-layer fields and the layers' cache indices."""
    layers = adapter.layers(model)
    kept = [layer for i, layer in enumerate(layers) if i not in set(indices)]
    parent_path, name = adapter.layers_path_of(model).rsplit(".", 1)
    setattr(model.get_submodule(parent_path), name, nn.ModuleList(kept))
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    shapes = adapter.shape_config(model.config)  # a vision-language wrapper's text_config: the decoder's fields
    for config in [model.config] if shapes is model.config else [model.config, shapes]:
        for field in per_layer_fields(config, len(layers)):
            setattr(config, field, [v for i, v in enumerate(getattr(config, field)) if i not in set(indices)])
    shapes.num_hidden_layers = len(kept)


NOT_PER_LAYER = ("architectures",)


def per_layer_fields(config, num_layers: int) -> list[str]:
    """The config fields holding one entry per decoder layer (``layer_types``, SmolLM3's ``no_rope_layers``,
    ``hf_snp_layers``, ...): lists as long as the layer count, other than token ids."""
    return [name for name, value in vars(config).items()
            if isinstance(value, list) and len(value) == num_layers and name not in NOT_PER_LAYER
            and not name.endswith(("_id", "_ids"))]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two sets of representations of the same tokens ([T, d] each)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()).clamp_min(1e-300))


def token_sample(states: list[tuple[torch.Tensor, torch.Tensor | None]], limit: int = 8192) -> torch.Tensor:
    """The final hidden states of the non-padding tokens of ``states`` ((hidden, token mask) per batch), at most
    ``limit`` of them, evenly spaced; with several ranks, evenly spaced over all ranks' tokens in rank order (each
    rank sends only its sampled rows; a rank may hold no batch)."""
    rows = []
    for hidden, mask in states:
        flat = hidden.reshape(-1, hidden.shape[-1]).float().cpu()
        rows.append(flat if mask is None else flat[mask.cpu()])
    tokens = torch.cat(rows) if rows else None
    counts = parallel.all_gather_objects(0 if tokens is None else len(tokens))
    total, start = sum(counts), sum(counts[:parallel.rank()])
    if tokens is not None and total > limit:
        picked = torch.linspace(0, total - 1, limit).long()
        tokens = tokens[picked[(picked >= start) & (picked < start + len(tokens))] - start]
    if parallel.world_size() == 1:
        return tokens
    return torch.cat([part for part in parallel.all_gather_objects(tokens) if part is not None])
