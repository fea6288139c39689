"""The streaming engine (DESIGN.md section 3).

Capture the inputs of block 0 for every calibration batch, then for each block in order:
bring it to the execution device, accumulate every site's statistics with hooks, decide,
cut and reconstruct, recompute the block's outputs with the pruned block (sequential mode:
later blocks see earlier errors), and send the block back. Submodules a cut does not change
(the attention when only MLP units are pruned) are replayed from a cache in the second
pass instead of being run again, and a statistics pass whose outputs are not needed stops
once every consumer has its inputs.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import ModelAdapter
from .calibration import CalibrationData
from .images import ImageCalibrationData
from .checkpoint import Checkpoint
from .allocation import SiteCurve, WidthRules
from .methods import MethodOptions, PruningMethod, SiteInputs
from .placement import BlockPlacement
from .sites import Site
from .stats import SiteStatistics

logger = logging.getLogger("hf_snp")

Calibration = CalibrationData | ImageCalibrationData


class _InputsCaptured(Exception):
    pass


class _StatisticsTaken(Exception):
    pass


@dataclass
class BlockInput:
    """One calibration batch at the entrance of the current block."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None  # [B*L] bool, None when no token is padding


class PhaseTimer:
    """Wall-clock seconds per phase (synchronising the device before reading the clock)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[phase] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def move(value: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go (the input embedding's device; CPU when it is offloaded)."""
    weight = next(model.get_input_embeddings().parameters())
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, calib: Calibration, batch_size: int, store: torch.device, progress: bool = True
) -> list[BlockInput]:
    """Run the model up to ``first_block`` for each calibration batch and keep the block's inputs.

    ``calib`` is text (``CalibrationData``) or images (``ImageCalibrationData``): anything whose
    ``model_batches`` yields forward kwargs and a token mask."""
    captured: list[BlockInput] = []
    token_mask: list[torch.Tensor | None] = [None]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
        captured.append(BlockInput(hidden.to(store), move(kwargs, store), token_mask[0]))
        raise _InputsCaptured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = input_device(model)
    try:
        batches = list(calib.model_batches(batch_size))
        for inputs, mask in tqdm(batches, desc="Capturing calibration inputs", disable=not progress, leave=False):
            token_mask[0] = mask
            try:
                model(**move(inputs, device))
            except _InputsCaptured:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("the first transformer block was not reached; is the adapter's layers_path right?")
    return captured


@contextmanager
def replay_outputs(module: nn.Module, next_output: Callable[[], Any]):
    """Make ``module`` return ``next_output()`` (one call per forward, in order) instead of running."""
    had_instance_forward = "forward" in module.__dict__
    original = module.forward
    module.forward = lambda *args, **kwargs: next_output()
    try:
        yield
    finally:
        if had_instance_forward:
            module.forward = original
        else:
            del module.forward


REPLAY_LIMIT_BYTES = 2 * 2**30  # cache the MLP consumer's inputs for the second pass when they fit in this


class StreamingEngine:
    """Prunes a model block by block. ``steps_for(site)`` gives each site's removal budget."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        method: PruningMethod,
        options: MethodOptions,
        targets: tuple[str, ...],
        steps_for: Callable[[Site], int],
        add_bias: bool | None,
        device: torch.device,
        store: torch.device,
        batch_size: int,
        gqa_mode: str = "per_group",
        progress: bool = True,
        checkpoint: Checkpoint | None = None,
    ):
        self.model, self.adapter, self.method, self.options = model, adapter, method, options
        self.targets, self.steps_for, self.add_bias, self.gqa_mode = targets, steps_for, add_bias, gqa_mode
        self.device, self.store, self.batch_size, self.progress = device, store, batch_size, progress
        self.checkpoint = checkpoint
        self.timer = PhaseTimer(device)

    def bias_available(self, site: Site) -> bool:
        if site.consumer_linear.bias is not None:
            return True
        return self.method.wants_added_bias if self.add_bias is None else self.add_bias

    def site_inputs(self, site: Site, stats: SiteStatistics, plan) -> SiteInputs:
        key = site.index * 2 + (site.kind == "heads")
        return SiteInputs(stats, plan, self.bias_available(site), site.consumer_linear.weight.detach(), key)

    @torch.no_grad()
    def score_blocks(self, calib: Calibration) -> list[float]:
        """Dense pass: each block's mean cosine similarity between its input and output hidden states."""
        layers = self.adapter.layers(self.model)
        with self.timer("capture"):
            inputs = capture_block_inputs(self.model, layers[0], calib, self.batch_size, self.store, self.progress)
        similarity = []
        for block in tqdm(layers, desc="Scoring blocks (dense)", disable=not self.progress):
            with self.timer("move"):
                placement = BlockPlacement.bring(block, self.device)
            total, count = 0.0, 0
            with self.timer("block_scores"):
                for item in inputs:
                    hidden = item.hidden.to(self.device)
                    out = block(hidden, **move(item.kwargs, self.device))
                    cosine = torch.nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1).flatten()
                    if item.token_mask is not None:
                        cosine = cosine[item.token_mask.to(cosine.device)]
                    total, count = total + float(cosine.sum()), count + cosine.numel()
                    item.hidden = out.to(self.store)
            similarity.append(total / max(count, 1))
            with self.timer("move"):
                placement.send_back(block)
        self.final_hidden = [(item.hidden, item.token_mask) for item in inputs]
        return similarity

    @torch.no_grad()
    def collect_curves(self, calib: Calibration, rules: WidthRules) -> list[SiteCurve]:
        """The dense statistics pass of global allocation: every site's removal costs, nothing cut."""
        layers = self.adapter.layers(self.model)
        with self.timer("capture"):
            inputs = capture_block_inputs(self.model, layers[0], calib, self.batch_size, self.store, self.progress)
        curves = []
        for index in tqdm(range(len(layers)), desc="Statistics pass (dense)", disable=not self.progress):
            block = layers[index]
            with self.timer("move"):
                placement = BlockPlacement.bring(block, self.device)
            sites = self.adapter.sites(block, index, self.targets, self.model.config, self.gqa_mode)
            stats = [SiteStatistics(site.name, site.num_units, self.device) for site in sites]
            handles = [site.consumer_linear.register_forward_pre_hook(s.hook) for site, s in zip(sites, stats)]
            try:
                with self.timer("curves_statistics"):
                    self._run_block(block, inputs, stats, keep_outputs=index < len(layers) - 1,
                                    consumers=tuple(site.consumer_linear for site in sites))
            finally:
                for handle in handles:
                    handle.remove()
            for site, site_stats in zip(sites, stats):
                with self.timer("curves_order"):
                    _, costs = self.method.order(self.site_inputs(site, site_stats, site.plan(site.curve_steps())), self.options)
                curves.append(SiteCurve.from_site(site, self.method.global_scores(costs), costs, rules))
            del stats
            with self.timer("move"):
                placement.send_back(block)
        return curves

    @torch.no_grad()
    def run(self, calib: Calibration, keep_final: bool = False) -> list[dict]:
        """Prune every block; returns one record per layer (each site's shape before and after).

        With ``keep_final`` the last block's outputs (the final hidden states of the pruned
        model) stay in ``self.final_hidden``."""
        layers = self.adapter.layers(self.model)
        with self.timer("capture"):
            inputs = capture_block_inputs(self.model, layers[0], calib, self.batch_size, self.store, self.progress)
        records: list[dict] = []
        if self.checkpoint is not None and self.checkpoint.completed:
            records = list(self.checkpoint.records)
            with self.timer("resume"):
                for index in tqdm(range(self.checkpoint.completed), desc="Restoring checkpointed blocks", disable=not self.progress, leave=False):
                    self._restore_block(layers[index], index, records[index], inputs)
        bar = tqdm(range(len(records), len(layers)), desc=f"Pruning blocks ({self.method.name})", disable=not self.progress)
        for index in bar:
            last = index == len(layers) - 1
            records.append(self._prune_block(layers[index], index, inputs, need_outputs=keep_final or not last, records=records))
        if keep_final:
            self.final_hidden = [(item.hidden, item.token_mask) for item in inputs]
        return records

    def _restore_block(self, block: nn.Module, index: int, record: dict, inputs: list[BlockInput]) -> None:
        """Re-cut a checkpointed block to its saved shapes, load its weights, and advance the inputs."""
        placement = BlockPlacement.bring(block, self.device)
        for site in self.adapter.sites(block, index, self.targets, self.model.config, self.gqa_mode):
            site.reshape_like(record)
        block.load_state_dict(self.checkpoint.load_block(index), strict=True)
        self._run_block(block, inputs, [], keep_outputs=True)
        placement.send_back(block)

    def _run_block(self, block: nn.Module, inputs: list[BlockInput], stats: list[SiteStatistics], keep_outputs: bool,
                   consumers: tuple[nn.Module, ...] = ()) -> None:
        """Run ``block`` on every batch. When its outputs are not kept, each forward stops as soon as
        all ``consumers`` have received their inputs (registered last, so after the statistics
        hooks): the rest of the block (at least the last consumer's matmul) would be wasted."""
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
                if handles:
                    waiting.update(consumers)
                try:
                    out = block(item.hidden.to(self.device), **move(item.kwargs, self.device))
                except _StatisticsTaken:
                    continue
                if keep_outputs:
                    item.hidden = out.to(self.store)
        finally:
            for handle in handles:
                handle.remove()

    def _mlp_replay_site(self, active: list, inputs: list[BlockInput]) -> Site | None:
        """The MLP site whose consumer inputs are worth caching: its MLP is a module of its own and they fit."""
        site = next((site for site, _ in active if site.kind == "mlp"), None)
        if site is None or not self.adapter.mlp.parent:
            return None
        tokens = sum(item.hidden.shape[:-1].numel() for item in inputs)
        return site if tokens * site.num_units * inputs[0].hidden.element_size() <= REPLAY_LIMIT_BYTES else None

    @contextmanager
    def _replayed(self, attention: nn.Module, attention_cache: list, mlp_site: Site | None, mlp_cache: list, keep):
        """Second pass: cached attention outputs; the cut MLP computed from its cached kept activations."""
        with ExitStack() as stack:
            if attention_cache:
                attention_queue = iter(attention_cache)
                stack.enter_context(replay_outputs(attention, lambda: (next(attention_queue).to(self.device), None)))
            if mlp_site is not None:
                mlp_queue, consumer, keep_index = iter(mlp_cache), mlp_site.consumer_linear, keep.to(self.store)
                stack.enter_context(replay_outputs(
                    mlp_site.parent, lambda: consumer(next(mlp_queue).index_select(-1, keep_index).to(self.device))))
            yield

    def _prune_block(self, block: nn.Module, index: int, inputs: list[BlockInput], need_outputs: bool, records: list[dict]) -> dict:
        with self.timer("move"):
            placement = BlockPlacement.bring(block, self.device)
        sites = self.adapter.sites(block, index, self.targets, self.model.config, self.gqa_mode)
        steps = [self.steps_for(site) for site in sites]
        active = [(site, n) for site, n in zip(sites, steps) if n > 0]
        if not active:
            with self.timer("recompute"):
                self._run_block(block, inputs, [], keep_outputs=need_outputs)
        else:
            stats = [SiteStatistics(f"{site.name} ({type(site.consumer_linear).__name__} input)", site.num_units, self.device) for site, _ in active]
            handles = [site.consumer_linear.register_forward_pre_hook(s.hook) for (site, _), s in zip(active, stats)]
            # only MLP units cut: replay the attention output, and the MLP from its kept activations
            attention, attention_cache = self.adapter.attention(block), []
            replay = need_outputs and not any(site.kind == "heads" for site, _ in active)
            mlp_site, mlp_cache = self._mlp_replay_site(active, inputs) if replay else None, []
            if replay:
                handles.append(attention.register_forward_hook(lambda m, a, out: attention_cache.append(out[0].to(self.store))))
            if mlp_site is not None:
                handles.append(mlp_site.consumer_linear.register_forward_pre_hook(lambda m, a: mlp_cache.append(a[0].to(self.store))))
            try:
                with self.timer("statistics"):
                    self._run_block(block, inputs, stats, keep_outputs=False, consumers=tuple(site.consumer_linear for site, _ in active))
            finally:
                for handle in handles:
                    handle.remove()
            keep = None
            for (site, n), site_stats in zip(active, stats):
                with self.timer("decide"):
                    decision = self.method.decide(self.site_inputs(site, site_stats, site.plan(n)), self.options)
                with self.timer("cut"):
                    site.apply(decision)
                if site is mlp_site:
                    keep = decision.keep
            del stats
            if need_outputs:
                with self.timer("recompute"), self._replayed(attention, attention_cache, mlp_site, mlp_cache, keep):
                    self._run_block(block, inputs, [], keep_outputs=True)
        record = {"layer": index}
        for site in sites:
            record.update(site.describe())
        if self.checkpoint is not None:
            with self.timer("checkpoint"):
                self.checkpoint.save(index, block, [*records, record])
        with self.timer("move"):
            placement.send_back(block)
        return record
