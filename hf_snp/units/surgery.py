"""Cutting linears in place: the modules keep their identity (and any accelerate hooks).

A module is an ``nn.Linear`` (weight [out, in]) or, with ``transposed``, a transformers ``Conv1D`` (weight
[in, out], GPT-2): its output units are then columns of the weight, its input units rows.
"""

from __future__ import annotations

import torch
from torch import nn

from .removal import Decision


def _set(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False) -> None:
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=module.weight.requires_grad)
    module.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=False)
    if transposed:
        module.nx, module.nf = weight.shape
    else:
        module.out_features, module.in_features = weight.shape


def keep_rows(module: nn.Module, rows: torch.Tensor, transposed: bool = False) -> None:
    """Keep only output units ``rows`` of a producer (rows of a Linear's weight, columns of a Conv1D's)."""
    rows = rows.to(module.weight.device)
    bias = None if module.bias is None else module.bias.data[rows]
    weight = module.weight.data[:, rows] if transposed else module.weight.data[rows]
    _set(module, weight, bias, transposed)


def fold_into_consumer(module: nn.Module, decision: Decision, transposed: bool = False) -> bool:
    """Apply W'_K = W_K + W_P coef, b' = b + W_P shift (or the dense-target mix, ``Decision.fold``; W as [out, in]:
    a Conv1D's weight transposed); returns True if a bias was added."""
    dtype = module.weight.dtype
    weight = module.weight.data.to(torch.float64)
    w_keep, delta = decision.fold(weight.T if transposed else weight)
    bias = None if module.bias is None else module.bias.data
    added = False
    if delta is not None:
        if bias is None:
            added, bias = True, delta.to(dtype)
        else:
            bias = (bias.to(torch.float64) + delta).to(dtype)
    w_keep = w_keep.to(dtype)
    _set(module, w_keep.T if transposed else w_keep, bias, transposed)
    return added
