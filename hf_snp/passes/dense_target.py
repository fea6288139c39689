"""Dense-target reconstruction (docs/design.md §3.7): the dense model's hidden states streamed beside the pruned
model's, and its consumer inputs h^d paired token by token with the pruned model's h~ in the statistics runs.

``BlockInput.dense`` holds a batch's dense hidden states at the current block; it is None while the two streams
are equal (until the first block whose cuts change its outputs), when the pruned stream's statistics are the
dense ones and SNP's map is §3.6's, exactly. Timings: ``dense_stream`` (the dense block's forwards),
``cross_moments`` (the pairing, part of ``statistics``).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Callable, ClassVar

import torch
from torch import nn

from ..units.protocols import Site
from ..units.reduction import all_reduce_cross, all_reduce_statistics
from ..units.stats import CrossMoments, SiteStatistics
from .block_inputs import BlockInput, PhaseTimer


@contextmanager
def _hooked(handles: list):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _recorders(sites: list[Site], into: dict[int, torch.Tensor]) -> list:
    """Pre-hooks that keep the units entering each site's consumer (``into[i]`` for ``sites[i]``)."""
    return [site.consumer_linear.register_forward_pre_hook(lambda module, args, i=i: into.__setitem__(i, args[0]))
            for i, site in enumerate(sites)]


class DenseStream:
    """The dense side of one cutting pass. Per block, the first statistics run (before any cut) runs each batch
    through the uncut block on the dense stream, recording the consumer inputs of the sites that need them, then
    the pruned stream's statistics forward pairs them with h~; the units of the sites cut after the first cut
    (``within_block='sequential'``) are kept until their own run."""

    always_pair: ClassVar[bool] = False  # pair even while the streams are equal (tests: the paired maths is §3.6's)

    def __init__(self, run_block: Callable[..., None], timer: PhaseTimer, device: torch.device, store: torch.device):
        """The engine's ``run_block`` (runs a block on batches), phase timer, execution device and store."""
        self.run_block, self.timer, self.device, self.store = run_block, timer, device, store
        self.diverged = False
        self.later: list[Site] = []
        self.recorded: list[list[torch.Tensor]] = []  # per batch: the dense units of each ``later`` site

    def start(self, inputs: list[BlockInput]) -> None:
        self.diverged = self.always_pair
        for item in inputs:
            item.dense = item.hidden if self.diverged else None

    def advance(self, block: nn.Module, inputs: list[BlockInput]) -> None:
        """Run the uncut ``block`` on the dense stream, keeping its outputs."""
        with self.timer("dense_stream"):
            for item in inputs:
                item.dense = self._forward(block, item, [], keep=True)[1]

    def restored(self, block: nn.Module, inputs: list[BlockInput], cut: bool) -> None:
        """A checkpointed block, before it is re-cut (``cut``: whether its record changed any width)."""
        if self.diverged or cut:
            self.advance(block, inputs)
        self.diverged = self.diverged or cut

    def _forward(self, block: nn.Module, item: BlockInput, sites: list[Site],
                 keep: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The uncut block on one batch of the dense stream: the units entering ``sites``' consumers, and the
        outputs (with ``keep``; else the forward stops once every consumer has its input)."""
        units: dict[int, torch.Tensor] = {}
        view = dataclasses.replace(item, hidden=item.hidden if item.dense is None else item.dense)
        with _hooked(_recorders(sites, units)):
            self.run_block(block, [view], keep_outputs=keep,
                                  consumers=tuple(site.consumer_linear for site in sites))
        return [units[i] for i in range(len(sites))], view.hidden if keep else None

    def _pairing(self, sites: list[Site], cross: list[CrossMoments], units: list[torch.Tensor]) -> list:
        """Pre-hooks that pair each site's pruned units with the dense ``units`` of the same batch."""
        timer = self.timer

        def pair(moments: CrossMoments, dense: torch.Tensor) -> Callable:
            def hook(module, args):
                with timer("cross_moments"):
                    moments.update(dense, args[0])
            return hook

        return [site.consumer_linear.register_forward_pre_hook(pair(c, u)) for site, c, u in zip(sites, cross, units)]

    def _new(self, sites: list[Site]) -> tuple[list[SiteStatistics], list[CrossMoments]]:
        device = self.device
        return ([site.new_statistics(device) for site in sites],
                [CrossMoments(site.name, site.num_units, device) for site in sites])

    def gather_first(self, block: nn.Module, group: list[Site], later: list[Site], inputs: list[BlockInput],
                     keep_dense: bool, extra_hooks: Callable[[], list] = list
                     ) -> tuple[list[SiteStatistics], list[CrossMoments | None]]:
        """The block's first statistics run: ``group``'s statistics, with cross moments where the streams differ;
        the dense units of ``later`` kept; the dense stream advanced when ``keep_dense``."""
        stats, cross = self._new(group)
        paired = group if self.diverged else []
        self.later, self.recorded = later, []
        stops = tuple(site.stop_module for site in group)
        for item in inputs:
            if self.diverged:
                with self.timer("dense_stream"):
                    units, out = self._forward(block, item, paired + later, keep_dense)
                with self.timer("statistics"), _hooked([h for s, site_stats in zip(group, stats)
                                                          for h in s.observe(site_stats)]
                                                         + self._pairing(paired, cross, units) + extra_hooks()):
                    self.run_block(block, [item], stats + cross, keep_outputs=False, consumers=stops)
                later_units = units[len(paired):]
                if keep_dense:
                    item.dense = out
            else:  # equal streams: this forward is the dense one (run in full when its outputs are kept)
                recorded: dict[int, torch.Tensor] = {}
                store = self.store

                def keep_outputs(batch: BlockInput, hidden: torch.Tensor, out: torch.Tensor) -> None:
                    batch.dense = out.to(store)

                with self.timer("statistics"), _hooked([h for s, site_stats in zip(group, stats)
                                                          for h in s.observe(site_stats)]
                                                         + _recorders(later, recorded) + extra_hooks()):
                    self.run_block(block, [item], stats, keep_outputs=False,
                                     consumers=() if keep_dense else stops + tuple(s.consumer_linear for s in later),
                                     observe=keep_outputs if keep_dense else None)
                later_units = [recorded[i] for i in range(len(later))]
            self.recorded.append([u.to(self.store) for u in later_units])
        return _reduced(stats, cross if paired else [None] * len(group))

    def gather_later(self, block: nn.Module, group: list[Site], inputs: list[BlockInput],
                     extra_hooks: Callable[[], list] = list) -> tuple[list[SiteStatistics], list[CrossMoments]]:
        """The statistics run of the ``later`` sites after the first cut, paired with their recorded dense units."""
        if [id(site) for site in group] != [id(site) for site in self.later]:
            raise RuntimeError("gather_later needs the sites whose dense units gather_first recorded")
        stats, cross = self._new(group)
        stops = tuple(site.stop_module for site in group)
        for item, units in zip(inputs, self.recorded):
            units = [u.to(self.device) for u in units]
            with self.timer("statistics_after_heads"), _hooked(
                    [h for s, site_stats in zip(group, stats) for h in s.observe(site_stats)]
                    + self._pairing(group, cross, units) + extra_hooks()):
                self.run_block(block, [item], stats + cross, keep_outputs=False, consumers=stops)
        self.later, self.recorded = [], []
        return _reduced(stats, cross)


def _reduced(stats: list[SiteStatistics], cross: list[CrossMoments | None]
             ) -> tuple[list[SiteStatistics], list[CrossMoments | None]]:
    """Both moments summed over the ranks' batches (docs/design.md §8.7)."""
    return [all_reduce_statistics(s) for s in stats], [None if c is None else all_reduce_cross(c) for c in cross]
