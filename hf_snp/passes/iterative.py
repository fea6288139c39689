"""Blocks and units together, round by round (docs/design.md §7.3), as in "Pruning Everything, Everywhere, All at
Once" (do Nascimento et al.): each round builds two candidates of one size from the current model, one that
removes a block and one that removes units, and keeps the one whose normalised final hidden states are more
similar (linear CKA) to the dense model's, on held-out calibration windows.

Nothing is copied whole. A block candidate is scored by streaming the held-out states past the block (a cosine
proxy for every block, then the exact CKA for the best few, each from its own input, kept from the proxy's
pass). A unit candidate prunes a copy of one block at a time, streams both splits through it and keeps only the
decisions; the winner's decisions are then applied to the model's own blocks. Memory: the model, one block's
copy, the decisions of one round (a fraction of one block) and a few held-out hidden-state snapshots.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..config import PruneConfig
from ..methods.base import PruningMethod
from ..units.allocation import WidthRules, allocate_per_budget, budget_scale, site_budget
from ..units.protocols import Site, SiteUnits
from ..units.records import LayerRecord
from ..units.removal import Decision
from ..units.sites import count_parameters
from .block_inputs import BlockInput, Calibration, MeanCosine, PhaseTimer, capture_block_inputs
from .blocks import linear_cka, remove_blocks, token_sample
from .engine import BlockVisit, StreamingEngine
from .placement import BlockPlacement, keep_freed_blocks_out_of_memory, move

HELDOUT_EVERY = 4  # one calibration window in four is held out for the CKA (never fitted)
CONFIRMED_BLOCKS = 3  # blocks whose exact CKA is computed each round, best cosine first
MAX_ROUNDS_PER_LAYER = 4  # a guard: rounds stop after this many per layer of the dense model


def split_calibration(calib: Calibration) -> tuple[Calibration, Calibration]:
    """(fitted, held-out) windows: every ``HELDOUT_EVERY``-th window is held out (the last one when fewer)."""
    count = calib.num_samples
    if count < 2:
        raise ValueError("the iterative block search holds out calibration windows for its CKA: num_samples must be "
                         "at least 2 (better 8 or more), or pass block_search='candidates'")
    held = [i for i in range(count) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1] or [count - 1]
    return calib.select([i for i in range(count) if i not in set(held)]), calib.select(held)


@dataclass
class UnitTrial:
    """A unit candidate: its decisions (layer, position among the layer's sites, decision), the layer records of
    its pass, the parameters it removes and the CKA of its final states."""

    decisions: list[tuple[int, int, Decision]]
    records: list[LayerRecord]
    params: int
    cka: float


@dataclass
class BlockScan:
    """The held-out stream through the current model: each block's input/output cosine, the inputs of the best
    eligible blocks so far (snapshots), and the final states."""

    cosines: list[float] = field(default_factory=list)
    snapshots: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    final: torch.Tensor | None = None


class IterativeSearch:
    """Prunes ``model`` in place, round by round, to ``config.sparsity`` of its decoder-layer parameters."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, calib: Calibration, config: PruneConfig,
                 method: PruningMethod, rules: WidthRules, timer: PhaseTimer, device: torch.device,
                 store: torch.device):
        self.model, self.adapter, self.rules, self.device, self.store = model, adapter, rules, device, store
        self.config = dataclasses.replace(config, targets=config.unit_targets)
        self.engine = StreamingEngine(model, adapter, self.config, method, device, store)
        self.engine.timer = self.timer = timer
        self.fit, self.held = split_calibration(calib)
        self.source = list(range(len(self.layers)))  # current layer -> layer of the dense model
        sites = self._sites()
        self.weight = {(s.index, s.slot): site_budget(s, self.config) for s in sites}  # by dense layer
        self.dense_params = {(s.index, s.slot): s.num_params() for s in sites}
        self.records = {i: LayerRecord(i, source_layer=i) for i in self.source}
        for site in sites:
            self.records[site.index] = self.records[site.index].with_part(site.describe())
        self.layer_params = sum(count_parameters(layer) for layer in self.layers)
        self.budget = config.sparsity * self.layer_params

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.model)

    def _sites(self) -> list[Site]:
        return [site for i, layer in enumerate(self.layers) for site in self.engine.sites(layer, i)]

    @torch.no_grad()
    def run(self) -> tuple[list[LayerRecord], dict]:
        """Prune round by round; the layer records and the report's ``blocks`` entry."""
        # every round frees and allocates a block copy, streams and width² float64 temporaries: without a fixed
        # mmap threshold glibc keeps the freed ones resident, and the RSS grows well past what is live
        keep_freed_blocks_out_of_memory()
        with self.timer("capture"):
            self.origin_fit = capture_block_inputs(self.model, self.layers, self.fit, self.config.batch_size,
                                                   self.store, self.config.progress)
            self.origin_held = capture_block_inputs(self.model, self.layers, self.held, self.config.batch_size,
                                                    self.store, self.config.progress)
        rounds, reuse, reference = [], None, None
        for number in range(MAX_ROUNDS_PER_LAYER * len(self.source)):
            start = time.perf_counter()
            params = [count_parameters(layer) for layer in self.layers]
            remaining = self.budget - (self.layer_params - sum(params))
            eligible = [j for j, p in enumerate(params) if p <= remaining] if len(params) > 1 else []
            with self.timer("block_scan"):
                scan = self._scan(eligible, reuse)
            if reference is None:
                reference, dense_cosines = scan.final, list(scan.cosines)
            block, block_cka = self._best_block(scan, eligible, reference)
            units = self._unit_trial(params[block] if block is not None else remaining, reference)
            if block is None and units.params == 0:
                break
            keep_block = block is not None and (units.params == 0 or block_cka >= units.cka)
            entry = {"round": number, "remaining_params": round(remaining),
                     "block": None if block is None else {"layer": self.source[block], "params": params[block],
                                                          "cosine": round(scan.cosines[block], 6),
                                                          "cka": round(block_cka, 6)},
                     "units": {"params": units.params, "cka": round(units.cka, 6)},
                     "kept": "block" if keep_block else "units"}
            if keep_block:
                reuse = self._remove_block(block, scan)
            else:
                self._apply(units)
                reuse = None
            entry["seconds"] = round(time.perf_counter() - start, 3)
            rounds.append(entry)
        removed = sorted(set(range(len(self.records))) - set(self.source))
        records = [dataclasses.replace(self.records[old], layer=new) for new, old in enumerate(self.source)]
        return records, {"search": "iterative", "budget_params": round(self.budget), "removed": removed,
                         "similarity": [round(v, 6) for v in dense_cosines],
                         "heldout_windows": self.held.num_samples, "rounds": rounds}

    # --- the block candidate -------------------------------------------------------------------------------

    def _fresh(self, origin: list[BlockInput], hidden: list[torch.Tensor] | None = None) -> list[BlockInput]:
        """Batches at block 0 (or with ``hidden`` at some later block), the layer kwargs shared with ``origin``."""
        hidden = hidden or [item.hidden for item in origin]
        return [BlockInput(h, item.layer_kwargs, item.token_mask) for h, item in zip(hidden, origin)]

    def _run(self, index: int, items: list[BlockInput], observe=None) -> None:
        """Run layer ``index`` on ``items``, keeping the outputs."""
        layer = self.layers[index]
        placement = BlockPlacement.bring(layer, self.device)
        try:
            for item in items:
                item.enter(index)
            self.engine.run_block(layer, items, keep_outputs=True, observe=observe)
        finally:
            placement.send_back(layer)

    def _final(self, items: list[BlockInput]) -> torch.Tensor:
        """The final-norm outputs of the non-padding tokens (``token_sample``)."""
        norm = self.adapter.final_norm(self.model)
        device = next(norm.parameters(), torch.empty(0, device=self.device)).device
        device = self.device if device.type == "meta" else device  # offloaded: its hook brings the weights
        states = [(norm(move(item.hidden, device)), item.token_mask) for item in items]
        return token_sample(states)

    def _scan(self, eligible: list[int], reuse: BlockScan | None) -> BlockScan:
        """Stream the held-out windows, scoring each block by the mean cosine of its input and output; keep the
        inputs of the ``CONFIRMED_BLOCKS`` best eligible blocks. ``reuse``: the scan of the blocks before the one
        a block round removed, valid while its snapshots still cover the best eligible blocks among them."""
        start = len(reuse.cosines) if reuse is not None else 0
        if reuse is not None and not set(_best(reuse.cosines, eligible)) <= set(reuse.snapshots):
            reuse, start = None, 0
        scan = BlockScan(list(reuse.cosines), dict(reuse.snapshots)) if reuse is not None else BlockScan()
        items = self._fresh(self.origin_held, reuse.snapshots[start] if reuse is not None else None)
        scan.snapshots.pop(start, None)
        for index in range(start, len(self.layers)):
            inputs, cosine = [item.hidden for item in items], MeanCosine()
            self._run(index, items, observe=cosine)
            scan.cosines.append(cosine.mean)
            if index in _best(scan.cosines, eligible):
                scan.snapshots[index] = inputs
            scan.snapshots = {i: s for i, s in scan.snapshots.items() if i in _best(scan.cosines, eligible)}
        scan.final = self._final(items)
        return scan

    def _best_block(self, scan: BlockScan, eligible: list[int], reference: torch.Tensor
                    ) -> tuple[int | None, float]:
        """Of the best eligible blocks by cosine, the one whose removal keeps the highest CKA (exact)."""
        best, best_cka = None, -1.0
        for index in _best(scan.cosines, eligible):
            with self.timer("block_cka"):
                items = self._fresh(self.origin_held, scan.snapshots[index])
                for later in range(index + 1, len(self.layers)):
                    self._run(later, items)
                cka = linear_cka(reference, self._final(items))
            if cka > best_cka:
                best, best_cka = index, cka
        return best, best_cka

    def _remove_block(self, index: int, scan: BlockScan) -> BlockScan:
        """Remove layer ``index``; the scan before it stays valid, with the removed block's input as the next
        block's."""
        remove_blocks(self.model, self.adapter, [index])
        del self.source[index]
        for item in self.origin_fit + self.origin_held:
            del item.layer_kwargs[index]
        snapshots = {i: s for i, s in scan.snapshots.items() if i <= index}
        return BlockScan(scan.cosines[:index], snapshots)

    # --- the unit candidate --------------------------------------------------------------------------------

    def _unit_steps(self, params: float) -> Callable[[Site], int]:
        """Steps per site to remove about ``params`` more parameters of units. Uniform: each surviving site is
        brought to its share (by the config's budgets on the dense model) of all units removed so far plus
        ``params``, so that coarse sites (a step of heads) take their steps as the total grows. Global: one
        threshold on the current model's cost curves (a statistics pass on the fitted windows)."""
        sites = self._sites()
        if self.config.resolved_allocation == "global":
            curves = self.engine.collect_curves(self.fit, self.rules)
            plan = allocate_per_budget(curves, self.config, budget_scale(sites, self.config, params))
            return lambda site: plan.steps[(site.index, site.kind)]
        keys = {(s.index, s.slot): (self.source[s.index], s.slot) for s in sites}
        removed = {key: self.dense_params[keys[key]] - s.num_params() for key, s in zip(keys, sites)}
        total_weight = sum(self.weight[k] for k in keys.values()) or 1.0
        goal = sum(removed.values()) + params
        targets = {key: max(goal * self.weight[keys[key]] / total_weight - removed[key], 0.0) for key in keys}
        steps = round_to_total(dict(zip(keys, sites)), targets, params, self.rules)
        return lambda site: steps[(site.index, site.slot)]

    def _unit_trial(self, params: float, reference: torch.Tensor) -> UnitTrial:
        """Prune a copy of each block in turn (fitted windows), stream the held-out windows through it, keep the
        decisions (on the store device) and the layer records."""
        steps_for = self._unit_steps(params)
        planned = sum(site.params_removed(steps_for(site)) for site in self._sites())
        if planned == 0:
            return UnitTrial([], [], 0, -1.0)
        fit, held = self._fresh(self.origin_fit), self._fresh(self.origin_held)
        decisions, records = [], []
        self.engine.decisions = decisions
        try:
            for index, layer in enumerate(self.layers):
                placement = BlockPlacement.bring(layer, self.device)
                try:
                    trial = copy.deepcopy(layer)
                    for item in fit + held:
                        item.enter(index)
                    visit = BlockVisit(index, trial, index == len(self.layers) - 1)
                    records.append(self.engine.prune_block(visit, fit, steps_for, need_outputs=not visit.is_last))
                    with self.timer("heldout_states"):
                        self.engine.run_block(trial, held, keep_outputs=True)
                    del trial
                finally:
                    placement.send_back(layer)
                decisions[:] = [(i, position, _moved(d, self.store)) for i, position, d in decisions]
        finally:
            self.engine.decisions = None
        return UnitTrial(decisions, records, planned, linear_cka(reference, self._final(held)))

    def _apply(self, trial: UnitTrial) -> None:
        """Apply a unit trial's decisions to the model's own blocks, and fold its records into ours."""
        by_layer: dict[int, list[tuple[int, Decision]]] = {}
        for index, position, decision in trial.decisions:
            by_layer.setdefault(index, []).append((position, decision))
        for index, decisions in by_layer.items():  # one site list per layer: a mixture's experts are cut together
            layer = self.layers[index]
            placement = BlockPlacement.bring(layer, self.device)
            try:
                sites = self.engine.sites(layer, index)
                with self.timer("cut"):
                    for position, decision in decisions:
                        sites[position].apply(_moved(decision, self.device))
            finally:
                placement.send_back(layer)
        for record in trial.records:
            source = self.source[record.layer]
            self.records[source] = self.records[source].after_cut(record)


def round_to_total(sites: dict[tuple, SiteUnits], targets: dict, total: float, rules: WidthRules) -> dict:
    """Allowed step counts near each site's target parameters whose sum comes nearest ``total``: every site starts
    at the most steps within its target, then sites move up to their next allowed count in order of how far their
    target reaches into that step (largest remainder) while that brings the sum nearer ``total``. Rounding each site
    on its own would take a coarse step (a third of the heads) in every layer in the same round. Tied sites (a
    layer's stacked experts) move together, as one site with their summed targets."""
    groups: dict = {}
    for key, site in sites.items():
        groups.setdefault((site.index, site.kind) if site.tied else key, []).append(key)
    steps, ups = {}, []
    for group, keys in groups.items():
        site, count = sites[keys[0]], len(keys)
        target = sum(targets[key] for key in keys) / count
        allowed = rules.allowed_steps(site)
        below = max(s for s in allowed if site.params_removed(s) <= target)
        steps.update(dict.fromkeys(keys, below))
        above = [s for s in allowed if s > below]
        if above:
            low, high = site.params_removed(below), site.params_removed(above[0])
            ups.append(((target - low) / (high - low), str(group), keys, above[0], count * (high - low)))
    removed = sum(sites[key].params_removed(s) for key, s in steps.items())
    for _, _, keys, step, extra in sorted(ups, key=lambda u: (-u[0], u[1])):
        if abs(removed + extra - total) < abs(removed - total):
            steps.update(dict.fromkeys(keys, step))
            removed += extra
    return steps


def _best(cosines: list[float], eligible: list[int]) -> list[int]:
    """The ``CONFIRMED_BLOCKS`` eligible blocks scored so far with the highest cosine (ties: the lower index)."""
    scored = [i for i in eligible if i < len(cosines)]
    return sorted(scored, key=lambda i: (-cosines[i], i))[:CONFIRMED_BLOCKS]


def _moved(decision: Decision, device: torch.device) -> Decision:
    """The decision with its tensors on ``device``."""
    changes = {f.name: getattr(decision, f.name).to(device) for f in dataclasses.fields(decision)
               if isinstance(getattr(decision, f.name), torch.Tensor)}
    return dataclasses.replace(decision, **changes)
