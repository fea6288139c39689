"""Moving one decoder block onto the execution device and back, accelerate placement included.

A model dispatched by accelerate (``device_map``, ``max_memory``, ``offload_folder``) keeps its
offloaded weights outside the module (CPU dict, the checkpoint's safetensors or ``.dat``
files) behind ``AlignDevicesHook``s. To prune a block we take its hooks off, materialise its
weights on the execution device, and afterwards write the pruned tensors back into the same
weights map and put the same hooks back, so the block leaves memory again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import named_module_tensors, offload_weight, set_module_tensor_to_device
from torch import nn

logger = logging.getLogger("hf_snp")


def move(value: Any, device: torch.device, moved: dict[int, torch.Tensor] | None = None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``. With ``moved`` (a memo shared across
    calls), a tensor met again is not copied again: what was shared stays shared."""
    if isinstance(value, torch.Tensor):
        if moved is None:
            return value.to(device, non_blocking=True)
        if id(value) not in moved:
            moved[id(value)] = value.to(device, non_blocking=True)
        return moved[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device, moved) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device, moved) for k, v in value.items()}
    return value


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go (the input embedding's device; CPU when it is offloaded)."""
    weight = next(model.get_input_embeddings().parameters())
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def _align_hooks(hook) -> list[AlignDevicesHook]:
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _tensor_names(module: nn.Module, hook: AlignDevicesHook) -> list[str]:
    return [name for name, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                     recurse=hook.place_submodules)]


@dataclass
class BlockPlacement:
    """Where a block lived before it was brought to the execution device."""

    home: torch.device
    hooks: list[tuple[nn.Module, object]] = field(default_factory=list)

    @classmethod
    def bring(cls, block: nn.Module, device: torch.device) -> "BlockPlacement":
        """Take accelerate hooks off ``block`` and put all its weights on ``device``."""
        hooks = [(mod, mod._hf_hook) for mod in block.modules() if hasattr(mod, "_hf_hook")]
        home = _first_real_device(block)
        for module, hook in hooks:
            offloaded = {}
            for align in _align_hooks(hook):
                if align.offload and align.weights_map is not None:
                    offloaded.update({name: align.weights_map[name] for name in _tensor_names(module, align)})
            remove_hook_from_module(module)
            for name, value in offloaded.items():
                set_module_tensor_to_device(module, name, device, value=value.clone())
        block.to(device)
        return cls(home=home, hooks=hooks)

    def send_back(self, block: nn.Module) -> None:
        """Return the (pruned) block to where it came from; offloaded weights are written back."""
        block.to(self.home)
        present = set(block.modules())
        for module, hook in self.hooks:
            if module not in present:  # replaced by the cut (e.g. an attention that lost every head)
                continue
            for align in _align_hooks(hook):
                if align.offload and align.weights_map is not None:
                    for name, value in named_module_tensors(module, include_buffers=align.offload_buffers,
                                                            recurse=align.place_submodules):
                        _store(align.weights_map, name, value.detach().to("cpu"))
            add_hook_to_module(module, hook)


def _first_real_device(block: nn.Module) -> torch.device:
    for tensor in block.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def _store(weights_map, name: str, value: torch.Tensor) -> None:
    """Write one tensor into an accelerate weights map (dict, PrefixedDataset, OffloadedWeightsLoader)."""
    prefix = ""
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):
        prefix += weights_map.prefix
        weights_map = weights_map.dataset
    key = prefix + name
    if isinstance(weights_map, dict):
        weights_map[key] = value
        return
    if key in weights_map.state_dict or value.numel() == 0 or weights_map.save_folder is None and not weights_map.index:
        weights_map.state_dict[key] = value
    else:
        if weights_map.save_folder is None:
            weights_map.save_folder = tempfile.mkdtemp(prefix="hf_snp_offload_")
        os.makedirs(weights_map.save_folder, exist_ok=True)
        offload_weight(value, key, weights_map.save_folder, index=weights_map.index)
    if key not in weights_map.all_keys:
        weights_map.all_keys.append(key)


def has_offloaded_weights(model: nn.Module) -> bool:
    """True when accelerate keeps some of the model's weights outside it (CPU or disk offload)."""
    return any(align.offload for module in model.modules() if hasattr(module, "_hf_hook")
               for align in _align_hooks(module._hf_hook))


def keep_freed_blocks_out_of_memory() -> bool:
    """On glibc, serve large buffers by mmap so that a block's freed buffers leave memory at once.

    By default glibc raises its mmap threshold after large frees and then keeps block-sized freed
    buffers in its heap: with every block offloaded, the process RSS then grows towards the model's
    size as blocks go by (benchmarks/cost.py: 1.4 GiB instead of 0.4 GiB at 32 blocks). Fixing
    the threshold (what ``MALLOC_MMAP_THRESHOLD_`` does) keeps it flat. Process-wide; skipped where
    the variable is already set or the C library is not glibc. Called for offloaded models and by the
    iterative block search (whose rounds free as much as they allocate)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    done = bool(hasattr(libc, "mallopt") and libc.mallopt(m_mmap_threshold, 128 * 1024))
    if done:
        logger.info("glibc's mmap threshold fixed at 128 KiB so that freed block buffers leave memory")
    return done
