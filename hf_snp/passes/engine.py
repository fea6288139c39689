"""The streaming engine (docs/design.md §8).

Capture the inputs of block 0 for every calibration batch, then for each block in order: bring it
to the execution device, accumulate every site's statistics with hooks, decide, cut and
reconstruct, recompute the block's outputs with the pruned block (later blocks see earlier
errors), and send the block back. One loop, :class:`BlockStream`, owns the capture, the
bring/send-back, the timers and the checkpoints; the three passes (block scores, the dense
statistics of global allocation, the cutting pass) are what each does with a block.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import parallel
from ..adapters.base import ModelAdapter
from ..config import PruneConfig
from ..methods.base import PruningMethod
from ..setup.checkpoint import Checkpoint
from ..units.allocation import SiteCurve, WidthRules
from ..units.protocols import Site
from ..units.records import LayerRecord
from ..units.reduction import all_reduce
from ..units.removal import Decision
from ..units.site_inputs import SiteInputs
from ..units.stats import CrossMoments, SiteStatistics
from .block_inputs import (
    BlockInput,
    Calibration,
    FinalHidden,
    MeanCosine,
    PhaseTimer,
    capture_block_inputs,
    residual_energy,
)
from .dense_target import DenseStream
from .placement import BlockPlacement, move
from .replay import ReplayCache

logger = logging.getLogger("hf_snp")
CURVE_SHARE = 0.25  # global allocation's curves: from a quarter of the calibration windows by default (§6.5)

class _StatisticsTaken(Exception):
    pass


@dataclass
class BlockVisit:
    """One block on the execution device. A pass sets ``record`` to have it checkpointed."""

    index: int
    block: nn.Module
    is_last: bool
    record: LayerRecord | None = None


@dataclass
class PassResult:
    """What the cutting pass produced: one record per layer, and the final hidden states when asked."""

    records: list[LayerRecord]
    final_hidden: FinalHidden | None = None


@dataclass
class BlockStream:
    """The one loop over blocks: capture block 0's inputs, restore checkpointed blocks, then for each
    block bring it, hand it to the pass, checkpoint its record, send it back."""

    engine: "StreamingEngine"
    calib: Calibration
    description: str
    checkpoint: Checkpoint | None = None
    dense: DenseStream | None = None
    inputs: list[BlockInput] = field(default_factory=list)
    records: list[LayerRecord] = field(default_factory=list)

    def __iter__(self) -> Iterator[BlockVisit]:
        engine = self.engine
        layers = engine.adapter.layers(engine.model)
        with engine.timer("capture"):
            self.inputs = capture_block_inputs(engine.model, layers, self.calib, engine.config.batch_size,
                                               engine.store, engine.config.progress)
        if self.dense is not None:
            self.dense.start(self.inputs)
        if self.checkpoint is not None and self.checkpoint.completed:
            self.records = list(self.checkpoint.records)
            with engine.timer("resume"):
                for index in range(self.checkpoint.completed):
                    self._restore(layers[index], index, self.records[index])
        bar = tqdm(range(len(self.records), len(layers)), desc=self.description, disable=not engine.config.progress)
        for index in bar:
            block = layers[index]
            with engine.timer("move"):
                placement = BlockPlacement.bring(block, engine.device)
            visit = BlockVisit(index, block, index == len(layers) - 1)
            for item in self.inputs:
                item.enter(index)
            yield visit
            if visit.record is not None:
                self.records.append(visit.record)
                if self.checkpoint is not None and parallel.is_main():
                    with engine.timer("checkpoint"):
                        self.checkpoint.save(index, block, self.records)
            with engine.timer("move"):
                placement.send_back(block)

    def final_hidden(self) -> FinalHidden:
        return [(item.hidden, item.token_mask) for item in self.inputs]

    def _restore(self, block: nn.Module, index: int, record: LayerRecord) -> None:
        """Re-cut a checkpointed block to its saved shapes, load its weights, and advance the inputs."""
        engine = self.engine
        placement = BlockPlacement.bring(block, engine.device)
        for item in self.inputs:
            item.enter(index)
        if self.dense is not None:
            self.dense.restored(block, self.inputs, record.changed)
        for site in engine.sites(block, index):
            site.reshape_like(record)
        block.load_state_dict(self.checkpoint.load_block(index), strict=True)
        engine.run_block(block, self.inputs, keep_outputs=True)
        placement.send_back(block)


class StreamingEngine:
    """Prunes a model block by block with the configured method, targets and GQA mode."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, config: PruneConfig, method: PruningMethod,
                 device: torch.device, store: torch.device, checkpoint: Checkpoint | None = None):
        self.model, self.adapter, self.config, self.method = model, adapter, config, method
        self.device, self.store, self.checkpoint = device, store, checkpoint
        self.timer = PhaseTimer(device)
        self.decisions: list[tuple[int, int, Decision]] | None = None  # (layer, site position, decision)
        self.curve_windows: int | None = None  # the calibration windows the last curves came from

    def sites(self, block: nn.Module, index: int, targets: tuple[str, ...] | None = None) -> list[Site]:
        targets = self.config.unit_targets if targets is None else targets
        sites = self.adapter.sites(block, index, targets, self.model.config, self.config.gqa_mode)
        if not self.weighs_post_norms:
            for site in sites:
                site.post_norm = None
        return sites

    @property
    def weighs_post_norms(self) -> bool:
        """Whether the statistics and decisions measure errors after the post-norms (docs/design.md §3.11): SNP's
        reconstruction of the pruned stream with ``post_norm_weights``."""
        return (self.method.weighs_post_norm and self.config.post_norm_weights
                and self.config.reconstruction_target == "pruned")

    def bias_available(self, site: Site) -> bool:
        return self.method.bias_available(site.consumer_has_bias, site.can_add_bias, self.config.add_bias)

    def site_inputs(self, site: Site, stats: SiteStatistics, steps: int, cross: CrossMoments | None = None
                    ) -> SiteInputs:
        key = site.index * 2 + (site.kind == "heads")
        return SiteInputs(stats, site.plan(steps), self.bias_available(site), site.consumer_weight, key, cross)

    @torch.no_grad()
    def score_blocks(self, calib: Calibration) -> tuple[list[float], FinalHidden]:
        """Dense pass: each block's mean cosine similarity between its input and output hidden states,
        and the final hidden states."""
        stream = BlockStream(self, calib, "Scoring blocks (dense)")
        similarity = []
        for visit in stream:
            cosine = MeanCosine()
            with self.timer("block_scores"):
                self.run_block(visit.block, stream.inputs, keep_outputs=True, observe=cosine)
            similarity.append(cosine.mean)
        return similarity, stream.final_hidden()

    @torch.no_grad()
    def collect_curves(self, calib: Calibration, rules: WidthRules) -> list[SiteCurve]:
        """The dense statistics pass of global allocation: every site's removal costs, nothing cut. With
        allocation='output_error' (docs/design.md §6.4) a step's cost is the consumer-output error it adds
        (``PruningMethod.output_errors``) over the residual-stream energy entering the block."""
        calib = self.curve_calibration(calib)
        stream, curves = BlockStream(self, calib, "Statistics pass (dense)"), []
        output_error = self.config.allocation_criterion == "output_error"
        for visit in stream:
            sites = self.sites(visit.block, visit.index)
            energy = residual_energy(stream.inputs, self.device) if output_error else None
            with self.timer("curves_statistics"):
                stats = self.gather_statistics(visit.block, sites, stream.inputs, keep_outputs=not visit.is_last)
            with self.timer("curves_order"):
                found = parallel.spread(lambda i: self._curve(sites[i], stats[i], energy), range(len(sites)))
            curves += [SiteCurve.from_site(site, scores, costs, rules, energy)
                       for site, (costs, scores) in zip(sites, found)]
        return curves

    def curve_calibration(self, calib: Calibration) -> Calibration:
        """The first windows of ``calib``, those the curves are taken from (docs/design.md §6.5):
        ``allocation_samples``, by default a quarter (CURVE_SHARE) but at least as many tokens as the widest site has
        units (full-rank statistics). Their number is left in ``curve_windows``."""
        count = self.config.allocation_samples
        if count is None:
            layers = self.adapter.layers(self.model)
            widest = max((site.num_units for index, layer in enumerate(layers) for site in self.sites(layer, index)),
                         default=0)
            per_window = max(calib.num_tokens / max(calib.num_samples, 1), 1)
            count = max(math.ceil(CURVE_SHARE * calib.num_samples), math.ceil(widest / per_window))
        self.curve_windows = min(count, calib.num_samples)
        return calib if count >= calib.num_samples else calib.select(list(range(count)))

    def _curve(self, site: Site, stats: SiteStatistics, energy: float | None) -> tuple[list[float], list | None]:
        """One site's (costs, scores) along its full order; ``energy``: the output_error criterion's divisor."""
        inputs = self.site_inputs(site, stats, site.curve_steps())
        if energy is not None:  # scores: the per-parameter slopes (allocation.convex_scores)
            return [cost / energy for cost in self.method.output_errors(inputs, self.config)], None
        _, costs = self.method.order(inputs, self.config)
        return costs, self.method.global_scores(costs)

    @torch.no_grad()
    def run(self, calib: Calibration, steps_for: Callable[[Site], int], keep_final: bool = False) -> PassResult:
        """The cutting pass: prune every block, ``steps_for(site)`` removal steps per site. Returns one
        record per layer (each site's shape before and after) and, with ``keep_final``, the final
        hidden states of the pruned model."""
        dense = None
        if self.config.reconstruction_target == "dense":
            dense = DenseStream(self.run_block, self.timer, self.device, self.store)
        stream = BlockStream(self, calib, f"Pruning blocks ({self.method.name})", self.checkpoint, dense)
        for visit in stream:
            visit.record = self.prune_block(visit, stream.inputs, steps_for,
                                             need_outputs=keep_final or not visit.is_last, dense=dense)
        return PassResult(stream.records, stream.final_hidden() if keep_final else None)

    def gather_statistics(self, block: nn.Module, sites: list[Site], inputs: list[BlockInput], keep_outputs: bool,
                          extra_hooks: Callable[[], list] = list, folds: int = 1) -> list[SiteStatistics]:
        """Run ``block`` on every batch with each site's statistics hooks (``Site.observe``: by default one
        pre-hook on its consumer); ``folds``: the token folds of held-out ridge selection (docs/design.md §3.8)."""
        stats = [site.new_statistics(self.device, folds) for site in sites]
        handles = [handle for site, s in zip(sites, stats) for handle in site.observe(s)]
        handles += extra_hooks()
        try:
            self.run_block(block, inputs, stats, keep_outputs, consumers=tuple(site.stop_module for site in sites))
        finally:
            for handle in handles:
                handle.remove()
        return [all_reduce(s) for s in stats]  # every rank's batches (docs/design.md §8.7)

    def run_block(self, block: nn.Module, inputs: list[BlockInput], stats: list[SiteStatistics] = (),
                  keep_outputs: bool = True, consumers: tuple[nn.Module, ...] = (),
                  observe: Callable[[BlockInput, torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """Run ``block`` on every batch (``observe(item, input, output)`` sees each). When its outputs are
        not kept, each forward stops as soon as all ``consumers`` have received their inputs (registered
        last, so after the statistics hooks): the rest of the block would be wasted work."""
        waiting: set[nn.Module] = set()

        def stop_when_all_seen(module, args):
            waiting.discard(module)
            if not waiting:
                raise _StatisticsTaken

        handles = [] if keep_outputs else [m.register_forward_pre_hook(stop_when_all_seen) for m in consumers]
        try:
            for item in inputs:
                for s in stats:
                    s.token_mask = item.token_mask
                waiting.update(consumers if handles else ())
                hidden = item.hidden.to(self.device)
                try:
                    out = block(hidden, **move(item.kwargs, self.device))
                except _StatisticsTaken:
                    continue
                if observe is not None:
                    observe(item, hidden, out)
                if keep_outputs:
                    item.hidden = out.to(self.store)
        finally:
            for handle in handles:
                handle.remove()

    def _replay_cache(self, block: nn.Module, active: list[Site], inputs: list[BlockInput], need_outputs: bool):
        """What the second pass may replay (nothing when the block's outputs are not needed)."""
        if not need_outputs:
            return ReplayCache(None, None, self.store, self.device)
        tokens = sum(item.hidden.shape[:-1].numel() for item in inputs)
        return ReplayCache.for_block(self.adapter, block, active, tokens, inputs[0].hidden.element_size(), self.store,
                                     self.device)

    def _cut_groups(self, active: list[tuple[Site, int]]) -> list[list[tuple[Site, int]]]:
        """The sites cut after one statistics run each: all at once ('joint'), or with ``within_block='sequential'``
        the heads first, then the others on the cut attention's outputs (docs/design.md §3.7)."""
        heads = [pair for pair in active if pair[0].kind == "heads"]
        others = [pair for pair in active if pair[0].kind != "heads"]
        if self.config.within_block == "sequential" and heads and others:
            return [heads, others]
        return [active]

    def _group_statistics(self, block: nn.Module, groups: list[list[Site]], number: int, inputs: list[BlockInput],
                          cache: ReplayCache, dense: DenseStream | None, keep_dense: bool
                          ) -> tuple[list[SiteStatistics], list[CrossMoments | None]]:
        """Statistics of ``groups[number]`` on the block as cut so far (with the dense side, §3.7)."""
        group = groups[number]
        if dense is not None and number == 0:
            later = [site for sites in groups[1:] for site in sites]
            return dense.gather_first(block, group, later, inputs, keep_dense, cache.record)
        if dense is not None:
            return dense.gather_later(block, group, inputs, cache.record)
        with self.timer("statistics" if number == 0 else "statistics_after_heads"):
            folds = self.config.ridge_folds if self.config.resolved_ridge == "heldout" else 1
            stats = self.gather_statistics(block, group, inputs, keep_outputs=False, extra_hooks=cache.record,
                                           folds=folds)
        return stats, [None] * len(stats)

    def _decide(self, group: list[tuple[Site, int]], stats: list[SiteStatistics],
                cross: list[CrossMoments | None]) -> list[Decision]:
        """Each site's decision; with several ranks each site is decided on one rank and broadcast (§8.7)."""
        def decide(position: int) -> Decision:
            (site, steps), site_stats, site_cross = group[position], stats[position], cross[position]
            decision = site.decide(self.method, self.site_inputs(site, site_stats, steps, site_cross), self.config)
            return decision if parallel.world_size() == 1 else decision.to(torch.device("cpu"))

        decisions = parallel.spread(decide, range(len(group)))
        return decisions if parallel.world_size() == 1 else [d.to(self.device) for d in decisions]

    def prune_block(self, visit: BlockVisit, inputs: list[BlockInput], steps_for: Callable[[Site], int],
                    need_outputs: bool, dense: DenseStream | None = None) -> LayerRecord:
        """Decide, cut and reconstruct every site of ``visit.block``; recompute its outputs into ``inputs`` when
        ``need_outputs``. Each decision is also appended to ``self.decisions`` when that is a list (the iterative
        search replays a trial copy's decisions on the model's own block). Returns the layer's record."""
        sites = self.sites(visit.block, visit.index)
        active = [(site, steps) for site in sites if (steps := steps_for(site)) > 0]
        keep_dense = dense is not None and not visit.is_last
        if not active:
            if keep_dense and dense.diverged:
                dense.advance(visit.block, inputs)
            with self.timer("recompute"):
                self.run_block(visit.block, inputs, keep_outputs=need_outputs)
        else:
            cache = self._replay_cache(visit.block, [site for site, _ in active], inputs, need_outputs)
            groups = self._cut_groups(active)
            keep = None
            for number, group in enumerate(groups):
                stats, cross = self._group_statistics(visit.block, [[site for site, _ in g] for g in groups], number,
                                                      inputs, cache, dense, keep_dense)
                with self.timer("decide"):
                    decisions = self._decide(group, stats, cross)
                for (site, steps), decision in zip(group, decisions):
                    site.ridge, site.choice = decision.ridge, decision.choice
                    if self.decisions is not None:
                        self.decisions.append((visit.index, sites.index(site), decision))
                    with self.timer("cut"):
                        site.apply(decision)
                    keep = decision.keep if site is cache.mlp_site else keep
                del stats, cross
            if dense is not None:
                dense.diverged = True
            if need_outputs:
                with self.timer("recompute"), cache.replaying(keep):
                    self.run_block(visit.block, inputs, keep_outputs=True)
        record = LayerRecord(visit.index)
        for site in sites:
            record = record.with_part(site.describe())
        return record
