"""The second pass's shortcut: replay what a cut did not change instead of running it again.

When only MLP units are cut, a block's attention output is the same in the second pass as in the
statistics pass, and the cut MLP's output is its consumer applied to the kept activations the
statistics pass already saw. Both are recorded during the statistics pass and replayed during the
second one (docs/design.md §8.3). What this assumes about a family is declared by its adapter
(``ModelAdapter.attention_returns_pair``, ``ModelAdapter.mlp_is_consumer_output``).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..units.protocols import Site
from ..units.sites import MlpSite
from .block_inputs import replay_outputs

REPLAY_LIMIT_BYTES = 2 * 2**30  # cache the MLP consumer's inputs for the second pass when they fit in this


class ReplayCache:
    """Records a block's attention outputs and its MLP consumer's inputs in the statistics pass and
    replays them in the second pass. ``attention`` None: nothing of the attention is replayed (heads
    are cut, or the family's attention does not return ``(output, weights)``); ``mlp_site`` None: the
    MLP is run again."""

    def __init__(self, attention: nn.Module | None, mlp_site: MlpSite | None, store: torch.device,
                 device: torch.device):
        self.attention, self.mlp_site, self.store, self.device = attention, mlp_site, store, device
        self.attention_outputs: list[torch.Tensor] = []
        self.mlp_inputs: list[torch.Tensor] = []

    @classmethod
    def for_block(cls, adapter, block: nn.Module, active: list[Site], num_tokens: int, element_size: int,
                  store: torch.device, device: torch.device) -> "ReplayCache":
        """What may be replayed when ``active`` sites are cut: only MLP cuts leave the attention as it was,
        and an ``MlpSite`` is replayed from its consumer when its inputs fit in REPLAY_LIMIT_BYTES."""
        if any(site.kind == "heads" for site in active):
            return cls(None, None, store, device)
        attention = adapter.attention(block) if adapter.attention_returns_pair else None
        mlp = next((site for site in active if site.kind == "mlp"), None)
        fits = isinstance(mlp, MlpSite) and num_tokens * mlp.num_units * element_size <= REPLAY_LIMIT_BYTES
        return cls(attention, mlp if fits and adapter.mlp_is_consumer_output else None, store, device)

    def record(self) -> list:
        """Hooks that fill the cache during the statistics pass (the caller removes them)."""
        handles = []
        if self.attention is not None:
            handles.append(self.attention.register_forward_hook(
                lambda module, args, out: self.attention_outputs.append(out[0].to(self.store))))
        if self.mlp_site is not None:
            handles.append(self.mlp_site.consumer_linear.register_forward_pre_hook(
                lambda module, args: self.mlp_inputs.append(args[0].to(self.store))))
        return handles

    @contextmanager
    def replaying(self, keep: torch.Tensor | None):
        """Second pass: cached attention outputs, and the cut MLP computed from its cached kept activations
        (``keep``: the units the MLP site kept)."""
        with ExitStack() as stack:
            if self.attention_outputs:
                queue = iter(self.attention_outputs)
                stack.enter_context(replay_outputs(self.attention, lambda: (next(queue).to(self.device), None)))
            if self.mlp_site is not None and keep is not None:
                inputs, consumer, index = iter(self.mlp_inputs), self.mlp_site.consumer_linear, keep.to(self.store)
                # indexing, not index_select: 3x faster on CPU for this column gather
                stack.enter_context(replay_outputs(
                    self.mlp_site.parent, lambda: consumer(next(inputs)[..., index].to(self.device))))
            yield
