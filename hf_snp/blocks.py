"""Whole-block pruning: score blocks by how little they change the residual stream, remove the most
redundant ones, and renumber what remains so the model (and its KV cache) stays consistent."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from .adapters import ModelAdapter


def block_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


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
    parent_path, name = adapter.layers_path.rsplit(".", 1)
    setattr(model.get_submodule(parent_path), name, nn.ModuleList(kept))
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(kept)
    for field in ("layer_types", "hf_snp_layers"):
        values = getattr(config, field, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, field, [v for i, v in enumerate(values) if i not in set(indices)])
