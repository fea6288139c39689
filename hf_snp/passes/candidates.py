"""Blocks together with units: candidates that meet one budget, judged by final-state CKA (docs/design.md §7.2).

The seed idea of "Pruning Everything, Everywhere, All at Once": build subnetworks that meet
the same parameter budget by block removal, by unit removal, and mixed (half of the budget by
blocks); keep the one whose final hidden states on the calibration data are most similar
(linear CKA) to the dense model's.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..config import PruneConfig
from ..methods.base import PruningMethod
from ..units.allocation import WidthRules, allocate_steps, budget_scale
from ..units.records import LayerRecord
from ..units.sites import count_parameters
from .block_inputs import Calibration, PhaseTimer
from .blocks import choose_blocks, linear_cka, remove_blocks, token_sample
from .engine import PassResult, StreamingEngine


@dataclass
class Candidate:
    name: str
    blocks: list[int]
    model: nn.Module
    records: list[LayerRecord] = field(default_factory=list)
    cka: float = 0.0
    params_removed: int = 0

    def summary(self) -> dict:
        return {"name": self.name, "blocks_removed": self.blocks, "params_removed": self.params_removed,
                "cka": round(self.cka, 6)}


def search_blocks_and_units(model: nn.Module, adapter: ModelAdapter, calib: Calibration, config: PruneConfig,
                            method: PruningMethod, rules: WidthRules, timer: PhaseTimer, device: torch.device,
                            store: torch.device) -> tuple[Candidate, dict]:
    """Prune copies of ``model`` three ways at one budget; return the best candidate and the comparison."""
    dense = StreamingEngine(model, adapter, config, method, device, store)
    dense.timer = timer
    similarity, final_hidden = dense.score_blocks(calib)
    reference = token_sample(final_hidden)
    params = [count_parameters(layer) for layer in adapter.layers(model)]
    budget = config.sparsity * sum(params)
    dense_count = count_parameters(model)
    candidates: list[Candidate] = []
    for name, block_budget in (("blocks", budget), ("units", 0.0), ("mixed", budget / 2)):
        blocks = choose_blocks(similarity, params, block_budget) if block_budget else []
        if any(c.blocks == blocks for c in candidates):
            continue  # the same subnetwork as an earlier candidate
        candidate = Candidate(name, blocks, copy.deepcopy(model))
        remove_blocks(candidate.model, adapter, blocks)
        kept = [i for i in range(len(params)) if i not in set(blocks)]
        remaining = max(budget - sum(params[i] for i in blocks), 0.0)
        engine = StreamingEngine(candidate.model, adapter, _after_blocks(config, kept), method, device, store)
        engine.timer = timer
        result = _prune_units(engine, calib, rules, remaining)
        candidate.records = [dataclasses.replace(r, source_layer=kept[r.layer]) for r in result.records]
        candidate.cka = linear_cka(reference, token_sample(result.final_hidden))
        candidate.params_removed = dense_count - count_parameters(candidate.model)
        candidates.append(candidate)
    best = max(candidates, key=lambda c: c.cka)
    comparison = {"similarity": [round(v, 6) for v in similarity], "removed": best.blocks, "chosen": best.name,
                  "budget_params": round(budget), "candidates": [c.summary() for c in candidates]}
    return best, comparison


def _after_blocks(config: PruneConfig, kept: list[int]) -> PruneConfig:
    """The config of the unit pass on a model that kept only the blocks ``kept`` (layer_sparsity renumbered)."""
    layer_sparsity = config.layer_sparsity and {new: config.layer_sparsity[old] for new, old in enumerate(kept)
                                                if old in config.layer_sparsity}
    return dataclasses.replace(config, targets=config.unit_targets, layer_sparsity=layer_sparsity or None)


def _prune_units(engine: StreamingEngine, calib: Calibration, rules: WidthRules, params: float) -> PassResult:
    """Remove ``params`` parameters of units with the configured allocation, in proportion to the config's budgets."""
    config = engine.config
    sites = [site for i, layer in enumerate(engine.adapter.layers(engine.model)) for site in engine.sites(layer, i)]
    scale = budget_scale(sites, config, params)
    curves = engine.collect_curves(calib, rules) if config.resolved_allocation == "global" and params > 0 else None
    steps_for, _ = allocate_steps(config, rules, curves, scale)
    return engine.run(calib, steps_for, keep_final=True)
