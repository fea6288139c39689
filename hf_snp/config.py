"""PruneConfig: every option of a pruning run, validated before any long work starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .methods import METHODS, ORDERINGS
from .sites import GQA_MODES

SUPPORTED_TARGETS = ("mlp", "heads", "blocks")


@dataclass
class PruneConfig:
    """What to prune and how. See ``hf_snp.prune`` for the meaning of each field."""

    method: str = "snp"
    sparsity: float = 0.3
    targets: tuple[str, ...] = ("mlp",)
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    batch_size: int = 8
    damping: float = 1e-6
    add_bias: bool | None = None
    layer_sparsity: dict[int, float] | None = field(default=None)
    gqa_mode: str = "per_group"
    allocation: str | None = None  # None: "uniform" (measured best on SmolLM2; see README)
    sparsity_per_target: dict[str, float] | None = None
    round_to: int | dict[str, int] | None = None
    min_width: int | dict[str, int] | None = None
    ordering: str = "zca"
    reconstruct: bool = True

    @property
    def resolved_allocation(self) -> str:
        """uniform unless asked: on SmolLM2 every global criterion measured so far lost to it."""
        return self.allocation or "uniform"

    def target_sparsity(self, target: str) -> float:
        return float((self.sparsity_per_target or {}).get(target, self.sparsity))

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if self.layer_sparsity is not None and not isinstance(self.layer_sparsity, Mapping):
            self.layer_sparsity = dict(enumerate(self.layer_sparsity))

    def validate(self, num_layers: int | None = None) -> "PruneConfig":
        """Raise ValueError naming the bad field and the fix; returns self."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        _check_fraction("sparsity", self.sparsity)
        if not self.targets:
            raise ValueError(f"targets is empty; choose from {SUPPORTED_TARGETS}")
        unknown = [t for t in self.targets if t not in SUPPORTED_TARGETS]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; supported targets: {SUPPORTED_TARGETS}")
        if self.allocation not in (None, "uniform", "global"):
            raise ValueError(f"unknown allocation {self.allocation!r}; choose 'uniform' or 'global'")
        if self.ordering not in ORDERINGS:
            raise ValueError(f"unknown ordering {self.ordering!r}; choose one of {ORDERINGS}")
        if self.ordering != "zca" and self.method != "snp":
            raise ValueError(f"ordering={self.ordering!r} is an SNP ablation; it does not apply to method {self.method!r}")
        for target, value in (self.sparsity_per_target or {}).items():
            if target not in self.targets:
                raise ValueError(f"sparsity_per_target names {target!r}, which is not among targets {list(self.targets)}")
            _check_fraction(f"sparsity_per_target[{target!r}]", value)
        if self.sparsity_per_target and self.layer_sparsity:
            raise ValueError("layer_sparsity and sparsity_per_target cannot be combined; choose one way to set budgets")
        if self.layer_sparsity and self.resolved_allocation == "global":
            raise ValueError("layer_sparsity fixes each layer's budget, which global allocation decides: pass allocation='uniform'")
        for name in ("round_to", "min_width"):
            value = getattr(self, name)
            entries = value.items() if isinstance(value, Mapping) else ([("mlp", value)] if value is not None else [])
            for target, number in entries:
                if target not in SUPPORTED_TARGETS or not isinstance(number, int) or isinstance(number, bool) or number < (1 if name == "round_to" else 0):
                    raise ValueError(f"{name} must be a positive integer or a {{target: integer}} mapping, got {value!r}")
        if self.gqa_mode not in GQA_MODES:
            raise ValueError(f"unknown gqa_mode {self.gqa_mode!r}; choose one of {GQA_MODES}")
        for name in ("num_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.damping, (int, float)) and 0 <= self.damping < 1):
            raise ValueError(f"damping must be in [0, 1) (a fraction of the mean diagonal), got {self.damping!r}")
        for layer, value in (self.layer_sparsity or {}).items():
            _check_fraction(f"layer_sparsity[{layer}]", value)
            if num_layers is not None and not 0 <= int(layer) < num_layers:
                raise ValueError(f"layer_sparsity names layer {layer}, but the model has layers 0..{num_layers - 1}")
        return self

    def sparsity_of_layer(self, index: int) -> float:
        return float((self.layer_sparsity or {}).get(index, self.sparsity))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data


def _check_fraction(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a fraction in [0, 1) (e.g. 0.3 removes 30%), got {value!r}")

