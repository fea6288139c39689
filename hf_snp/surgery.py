"""Cutting linears in place: the modules keep their identity (and any accelerate hooks)."""

from __future__ import annotations

import torch
from torch import nn

from .removal import Decision


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    linear.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep only output units ``rows`` of a producer linear."""
    rows = rows.to(linear.weight.device)
    bias = None if linear.bias is None else linear.bias.data[rows]
    _set(linear, linear.weight.data[rows], bias)


def fold_into_consumer(linear: nn.Linear, decision: Decision) -> bool:
    """Apply W'_K = W_K + W_P coef, b' = b + W_P shift; returns True if a bias was added."""
    dtype, device = linear.weight.dtype, linear.weight.device
    weight = linear.weight.data.to(torch.float64)
    keep, drop = decision.keep.to(device), decision.drop.to(device)
    w_keep, w_drop = weight[:, keep], weight[:, drop]
    if decision.coef is not None:
        w_keep = w_keep + w_drop @ decision.coef.to(device)
    bias = None if linear.bias is None else linear.bias.data
    added = False
    if decision.shift is not None:
        delta = w_drop @ decision.shift.to(device)
        if bias is None:
            added, bias = True, delta.to(dtype)
        else:
            bias = (bias.to(torch.float64) + delta).to(dtype)
    _set(linear, w_keep.to(dtype), bias)
    return added

