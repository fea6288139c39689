"""Checks on shapes only, before any weights load: budgets that cannot be met, rank-deficient
calibration, budgets below one removal step, a save format that would refuse the result."""

from __future__ import annotations

import logging
import warnings

import torch
from transformers import PreTrainedModel

from ..adapters.base import ModelAdapter
from ..config import PruneConfig
from ..deliver.save_format import check_save_format, config_shapes
from ..methods.base import PruningMethod
from ..models.modeling_hf_snp import LayerShape
from ..units.allocation import WidthRules, allocate_steps, nearest_steps
from ..units.protocols import SiteUnits

logger = logging.getLogger("hf_snp")


class RankDeficientCalibrationWarning(UserWarning):
    """Calibration tokens are fewer than the units of a site."""


def shape_model(model_config, auto_class: str = "AutoModelForCausalLM",
                trust_remote_code: bool = False) -> PreTrainedModel:
    """The model built on the meta device: its shapes, no weights (for checks before loading)."""
    import transformers

    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(model_config, trust_remote_code=trust_remote_code)


def preflight(adapter: ModelAdapter, shapes: PreTrainedModel, config: PruneConfig, method: PruningMethod,
              rules: WidthRules, num_tokens: int) -> None:
    """Refuse budgets that min_width / round_to make impossible and results the save format would refuse;
    warn about rank-deficient statistics and budgets too small for one step."""
    layers = adapter.layers(shapes)
    sites = [site for i, layer in enumerate(layers)
             for site in adapter.sites(layer, i, config.targets, shapes.config, config.gqa_mode)]
    for target in config.unit_targets:
        own = [site for site in sites if site.kind == target]
        total = sum(site.num_params() for site in own)
        reachable = sum(site.params_removed(max(rules.allowed_steps(site))) for site in own)
        budget = config.target_sparsity(target) * total
        if budget > reachable + max(site.params_per_step() for site in own):
            raise ValueError(
                f"the budget cannot be met: {config.target_sparsity(target):.0%} of {target} is {budget:,.0f} "
                f"parameters, but with min_width={config.min_width!r} and round_to={config.round_to!r} at most "
                f"{reachable:,} ({reachable / total:.0%}) can be removed; "
                "lower the sparsity or relax min_width / round_to"
            )
    if sites:
        _warnings(sites[: len(config.unit_targets)], config, rules, num_tokens)
    if "blocks" not in config.targets:
        predicted = _predicted_shapes(shapes.config, len(layers), sites, config, method, rules)
        check_save_format(adapter, shapes.config, predicted)


def _predicted_shapes(model_config, num_layers: int, sites: list[SiteUnits], config: PruneConfig, method: PruningMethod,
                      rules: WidthRules) -> list[LayerShape] | None:
    """Each layer's shape after uniform allocation (an added bias wherever the method may add one);
    None under global allocation, whose widths are known only after its dense pass."""
    if config.resolved_allocation != "uniform":
        return None
    steps_for, _ = allocate_steps(config, rules)
    predicted = config_shapes(model_config, num_layers)
    for site in sites:
        steps = steps_for(site)
        bias = steps > 0 and not site.consumer_has_bias and \
            method.bias_available(site.consumer_has_bias, site.can_add_bias, config.add_bias)
        predicted[site.index] = predicted[site.index].updated(site.shape_after(steps, bias))
    return predicted


def _warnings(sites: list[SiteUnits], config: PruneConfig, rules: WidthRules, num_tokens: int) -> None:
    widest = max(sites, key=lambda site: site.num_units)
    if num_tokens < widest.num_units:
        _warn(RankDeficientCalibrationWarning,
              f"calibration has {num_tokens} tokens but the widest site ({widest.kind}, {widest.num_units} units) "
              f"needs at least {widest.num_units} for full-rank statistics: damping keeps them usable, but the "
              f"ordering and reconstruction are poorly determined; use num_samples x seq_len >= {widest.num_units}")
    for site in sites if config.resolved_allocation == "uniform" else []:
        if (config.sparsity > 0
                and nearest_steps(site, config.target_sparsity(site.kind) * site.num_params(), rules) == 0):
            first = min((steps for steps in rules.allowed_steps(site) if steps), default=1)  # widths' multiples
            step = site.params_removed(first) / site.num_params()
            _warn(UserWarning, f"sparsity {config.sparsity:.0%} of {site.kind} rounds to nothing per layer: "
                               f"one removal step takes {step:.0%} of a layer's {site.kind} parameters; "
                               "raise the sparsity for this target")


def _warn(category: type[Warning], message: str) -> None:
    warnings.warn(message, category, stacklevel=5)
    logger.warning(message)
