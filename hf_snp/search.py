"""Blocks together with units: candidates that meet one budget, judged by final-state CKA.

The seed idea of "Pruning Everything, Everywhere, All at Once": build subnetworks that meet
the same parameter budget by block removal, by unit removal, and mixed (half of the budget by
blocks); keep the one whose final hidden states on the calibration data are most similar
(linear CKA) to the dense model's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .adapters import ModelAdapter
from .allocation import WidthRules, allocate_global, nearest_steps
from .blocks import choose_blocks, linear_cka, remove_blocks, token_sample
from .calibration import CalibrationData
from .config import PruneConfig
from .sites import count_parameters


@dataclass
class Candidate:
    name: str
    blocks: list[int]
    model: nn.Module
    records: list[dict] = field(default_factory=list)
    cka: float = 0.0
    params_removed: int = 0

    def summary(self) -> dict:
        return {"name": self.name, "blocks_removed": self.blocks, "params_removed": self.params_removed, "cka": round(self.cka, 6)}


def search_blocks_and_units(model: nn.Module, adapter: ModelAdapter, make_engine: Callable, calib: CalibrationData,
                            config: PruneConfig, rules: WidthRules) -> tuple[Candidate, dict]:
    """Prune copies of ``model`` three ways at one budget; return the best candidate and the comparison."""
    dense = make_engine(model, ())
    similarity = dense.score_blocks(calib)
    reference = token_sample(*zip(*dense.final_hidden))
    params = [count_parameters(layer) for layer in adapter.layers(model)]
    budget = config.sparsity * sum(params)
    unit_targets = tuple(t for t in config.targets if t != "blocks")
    dense_count = count_parameters(model)
    candidates: list[Candidate] = []
    for name, block_budget in (("blocks", budget), ("units", 0.0), ("mixed", budget / 2)):
        blocks = choose_blocks(similarity, params, block_budget) if block_budget else []
        if any(c.blocks == blocks for c in candidates):
            continue  # the same subnetwork as an earlier candidate
        candidate = Candidate(name, blocks, copy.deepcopy(model))
        remove_blocks(candidate.model, adapter, blocks)
        engine = make_engine(candidate.model, unit_targets)
        remaining = max(budget - sum(params[i] for i in blocks), 0.0)
        if config.resolved_allocation == "global" and remaining > 0:
            curves = engine.collect_curves(calib, rules)
            plan = allocate_global(curves, remaining)
            engine.steps_for = lambda site, steps=plan.steps: steps[(site.index, site.kind)]
        else:
            sites = [s for i, layer in enumerate(adapter.layers(candidate.model))
                     for s in adapter.sites(layer, i, unit_targets, candidate.model.config, config.gqa_mode)]
            fraction = remaining / max(sum(s.num_params() for s in sites), 1)
            engine.steps_for = lambda site, f=fraction: nearest_steps(site, f * site.num_params(), rules)
        kept = [i for i in range(len(params)) if i not in set(blocks)]
        candidate.records = [{**r, "source_layer": kept[r["layer"]]} for r in engine.run(calib, keep_final=True)]
        candidate.cka = linear_cka(reference, token_sample(*zip(*engine.final_hidden)))
        candidate.params_removed = dense_count - count_parameters(candidate.model)
        candidates.append(candidate)
    best = max(candidates, key=lambda c: c.cka)
    comparison = {"similarity": [round(v, 6) for v in similarity], "removed": best.blocks, "chosen": best.name,
                  "budget_params": round(budget), "candidates": [c.summary() for c in candidates]}
    return best, comparison
