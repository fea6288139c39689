"""The pruning passes of a run: whole blocks, the block/unit candidate search, or units with uniform or
global allocation."""

from __future__ import annotations

import time
from dataclasses import dataclass

from transformers import PreTrainedModel

from ..setup.prune_run import PruneRun
from ..units.allocation import Allocation, SiteCurve, allocate_steps
from ..units.records import LayerRecord
from ..units.sites import count_parameters
from .blocks import choose_blocks, remove_blocks
from .candidates import search_blocks_and_units
from .engine import StreamingEngine
from .iterative import IterativeSearch


@dataclass
class Passes:
    """What the passes produced. ``dense_pass``: seconds of the passes before the cuts (block scores,
    global allocation's statistics, the candidate search); ``cut_pass``: seconds of the cutting pass."""

    model: PreTrainedModel
    records: list[LayerRecord]
    timings: dict[str, float]
    dense_pass: float = 0.0
    cut_pass: float = 0.0
    curves: list[SiteCurve] | None = None
    plan: Allocation | None = None
    blocks: dict | None = None


def run_passes(run: PruneRun, model: PreTrainedModel) -> Passes:
    """Blocks (alone, or with units: the iterative search or the three candidates), or units with uniform or
    global allocation."""
    config, start = run.config, time.perf_counter()
    engine = StreamingEngine(model, run.adapter, config, run.method, run.device, run.store, run.checkpoint)
    if "blocks" in config.targets and config.unit_targets and config.block_search == "iterative":
        records, blocks = IterativeSearch(model, run.adapter, run.calib, config, run.method, run.rules, engine.timer,
                                          run.device, run.store).run()
        return Passes(model, records, engine.timer.seconds, dense_pass=time.perf_counter() - start, blocks=blocks)
    if "blocks" in config.targets and config.unit_targets:
        best, comparison = search_blocks_and_units(model, run.adapter, run.calib, config, run.method, run.rules,
                                                   engine.timer, run.device, run.store)
        return Passes(best.model, best.records, engine.timer.seconds, dense_pass=time.perf_counter() - start,
                      blocks=comparison)
    if "blocks" in config.targets:
        return _remove_blocks(run, engine, model, start)
    curves = engine.collect_curves(run.calib, run.rules) if config.resolved_allocation == "global" else None
    steps_for, plan = allocate_steps(config, run.rules, curves)
    if plan is not None:
        plan.curve_windows = engine.curve_windows
    dense_pass = time.perf_counter() - start
    records = engine.run(run.calib, steps_for).records
    return Passes(model, records, engine.timer.seconds, dense_pass, time.perf_counter() - start - dense_pass, curves,
                  plan)


def _remove_blocks(run: PruneRun, engine: StreamingEngine, model: PreTrainedModel, start: float) -> Passes:
    """Score every block in one dense pass and remove the most input-preserving ones to the budget."""
    similarity, _ = engine.score_blocks(run.calib)
    params = [count_parameters(layer) for layer in run.adapter.layers(model)]
    removed = choose_blocks(similarity, params, run.config.sparsity * sum(params))
    remove_blocks(model, run.adapter, removed)
    kept = [i for i in range(len(params)) if i not in set(removed)]
    records = [LayerRecord(new, source_layer=old) for new, old in enumerate(kept)]
    return Passes(model, records, engine.timer.seconds, dense_pass=time.perf_counter() - start,
                  blocks={"similarity": [round(v, 6) for v in similarity], "removed": removed})
