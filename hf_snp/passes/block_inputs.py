"""The calibration batches at a block's entrance, captured once, and what is measured on them as they pass.

``capture_block_inputs`` runs the model up to its first block for every batch and keeps the hidden
states with each block's keyword arguments; the engine then carries them from block to block.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import parallel
from .placement import input_device, move


class Calibration(Protocol):
    """Calibration data as the passes see it (``CalibrationData`` for text, ``ImageCalibrationData`` for images):
    batches of forward keyword arguments, each with its token mask ([B*L] bool, None when nothing is padding)."""

    @property
    def num_samples(self) -> int:
        ...

    @property
    def num_tokens(self) -> int:
        ...

    def select(self, indices: list[int]) -> "Calibration":
        ...

    def model_batches(self, batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        ...

FinalHidden = list[tuple[torch.Tensor, "torch.Tensor | None"]]  # per batch: last block's outputs, token mask


class _InputsCaptured(Exception):
    pass


@dataclass
class BlockInput:
    """One calibration batch at the entrance of the current block: its hidden states, the keyword arguments the
    model passes to each block (attention mask, rotary embeddings: they differ between layer types, e.g. sliding
    and full attention), and ``kwargs``, those of the current block."""

    hidden: torch.Tensor
    layer_kwargs: list[dict[str, Any]]
    token_mask: torch.Tensor | None  # [B*L] bool, None when no token is padding
    kwargs: dict[str, Any] = field(default_factory=dict)
    dense: torch.Tensor | None = None  # the dense model's hidden states (DenseStream; None: equal to ``hidden``)

    def enter(self, index: int) -> None:
        self.kwargs = self.layer_kwargs[index]


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


@contextmanager
def replay_outputs(module: nn.Module, next_output: Callable[..., Any], passes_inputs: bool = False):
    """Make ``module`` return ``next_output()`` (one call per forward, in order; with ``passes_inputs``, called
    with the forward's arguments) instead of running. Forward hooks still run."""
    had_instance_forward = "forward" in module.__dict__
    original = module.forward
    module.forward = next_output if passes_inputs else (lambda *args, **kwargs: next_output())
    try:
        yield
    finally:
        if had_instance_forward:
            module.forward = original
        else:
            del module.forward


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, calib: Calibration, batch_size: int,
                         store: torch.device, progress: bool = True) -> list[BlockInput]:
    """For each calibration batch, the hidden states entering the first block and the keyword arguments of
    every block. The blocks are passed through while capturing (each returns its input, nothing is computed),
    and the forward stops at the last block, before the model's head.

    ``calib`` is text (``CalibrationData``) or images (``ImageCalibrationData``): anything whose
    ``model_batches`` yields forward kwargs and a token mask."""
    captured: list[BlockInput] = []
    batch: dict[str, Any] = {}

    def hook(module, args, kwargs, index):
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
        if index == 0:
            batch.update(hidden=hidden.to(store), layer_kwargs=[], moved={})
        batch["layer_kwargs"].append(move(kwargs, store, batch["moved"]))  # tensors shared by blocks stay shared
        if index == len(layers) - 1:
            raise _InputsCaptured

    with ExitStack() as stack:
        for index, layer in enumerate(layers):
            handle = layer.register_forward_pre_hook(lambda m, a, k, i=index: hook(m, a, k, i), with_kwargs=True)
            stack.callback(handle.remove)
            if index < len(layers) - 1:
                stack.enter_context(replay_outputs(layer, lambda *args, **kwargs: args[0] if args
                                                   else kwargs["hidden_states"], passes_inputs=True))
        device = input_device(model)
        batches = parallel.shard(list(calib.model_batches(batch_size)))  # this rank's share (docs/design.md §8.7)
        for inputs, mask in tqdm(batches, desc="Capturing calibration inputs", disable=not progress, leave=False):
            batch.clear()
            try:
                model(**move(inputs, device))
            except _InputsCaptured:
                captured.append(BlockInput(batch["hidden"], batch["layer_kwargs"], mask))
    if len(captured) != len(batches):
        raise RuntimeError("the last transformer block was not reached; is the adapter's layers_path right?")
    return captured


@torch.no_grad()
def residual_energy(inputs: list[BlockInput], device: torch.device) -> float:
    """E||x||^2: the mean, over the non-padding calibration tokens, of the squared norm of the hidden state
    entering the current block (allocation='output_error' divides each site's output errors by it, §6.4)."""
    total, count = 0.0, 0
    for item in inputs:
        hidden = item.hidden.to(device)
        squared = torch.linalg.vector_norm(hidden.reshape(-1, hidden.shape[-1]), dim=-1, dtype=torch.float32).pow(2)
        if item.token_mask is not None:
            squared = squared[item.token_mask.to(squared.device)]
        total, count = total + float(squared.double().sum()), count + squared.numel()
    total, count = parallel.sum_over_ranks(total, count)
    return max(total / max(count, 1), torch.finfo(torch.float32).tiny)


class MeanCosine:
    """A ``run_block`` observer: the mean, over non-padding tokens, of the cosine between a block's input and output
    hidden states (the block score of docs/design.md §7.1)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def __call__(self, item: BlockInput, hidden: torch.Tensor, out: torch.Tensor) -> None:
        values = torch.nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1).flatten()
        if item.token_mask is not None:
            values = values[item.token_mask.to(values.device)]
        self.total, self.count = self.total + float(values.sum()), self.count + values.numel()

    @property
    def mean(self) -> float:
        """Over every rank's tokens (a collective when the run is distributed: every rank reads it)."""
        total, count = parallel.sum_over_ranks(self.total, self.count)
        return total / max(count, 1)
