"""The public entry point: hf_snp.prune."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from transformers import PreTrainedModel

from . import __version__
from .adapters import get_adapter
from .calibration import is_text_calibration, load_calibration
from .images import check_modality, load_image_calibration
from .checkpoint import Checkpoint, fingerprint
from .config import PruneConfig
from .allocation import Allocation, SiteCurve, WidthRules, allocate_global, nearest_steps
from .blocks import choose_blocks, remove_blocks
from .engine import StreamingEngine
from .search import search_blocks_and_units
from .sites import count_parameters
from .hub import push_folder
from .loading import ModelSource, load_config, load_image_processor, load_model, load_tokenizer
from .methods import MethodOptions, get_method
from .placement import has_offloaded_weights, keep_freed_blocks_out_of_memory
from .recipes import accepts_recipe
from .report import SCHEMA_VERSION, PruneReport
from .saving import finalize_architecture, prepare_output_dir, save_pruned

logger = logging.getLogger("hf_snp")


@dataclass
class PruneResult:
    """The pruned model (a PreTrainedModel, pruned in place) and the run's report."""

    model: PreTrainedModel
    report: PruneReport
    tokenizer: Any = None
    image_processor: Any = None

    def save(self, output_dir: str, overwrite: bool = False) -> None:
        save_pruned(self.model, self.tokenizer, self.report, output_dir, overwrite, image_processor=self.image_processor)

    def push_to_hub(self, repo_id: str, private: bool = False, folder: str | None = None, token: str | None = None) -> str:
        """Upload the pruned model with its tokenizer, report and model card; returns the commit URL."""
        if folder is not None:
            return push_folder(folder, repo_id, private=private, token=token)
        with tempfile.TemporaryDirectory(prefix="hf_snp_push_") as staging:
            target = os.path.join(staging, "model")
            self.save(target)
            return push_folder(target, repo_id, private=private, token=token)


# modality -> (loader, what it is, the argument that supplies it, the ready-made calibration that needs none)
PREPROCESSORS = {
    "text": (load_tokenizer, "a tokenizer", "tokenizer", "token-id calibration"),
    "image": (load_image_processor, "the model's image processor", "image_processor", "a pixel_values tensor"),
}


def _preprocessor_if_available(modality: str, source: ModelSource, trust_remote_code: bool, needed: bool):
    """The model's tokenizer or image processor; an error only when the calibration needs one."""
    loader, what, argument, ready = PREPROCESSORS[modality]
    try:
        return loader(source, trust_remote_code)
    except (OSError, ValueError) as error:
        if needed:
            raise ValueError(f"{modality} calibration needs {what}, and none loads from {source.path!r} ({error}); "
                             f"pass {argument}=... or {ready}") from error
        logger.info("no %s loads from %s; the calibration is %s, so none is needed", what, source.path, ready)
        return None


def load_calibration_for(adapter, model_config, calibration, tokenizer, image_processor, config: PruneConfig):
    """Token windows for a text model, pixel values for an image model."""
    if adapter.modality == "image":
        return load_image_calibration(calibration, image_processor, config.num_samples, config.seed,
                                      adapter.tokens_per_sample(model_config))
    return load_calibration(calibration, tokenizer, config.num_samples, config.seq_len, config.seed)


@dataclass
class Passes:
    """What the pruning passes produced."""

    model: PreTrainedModel
    records: list[dict]
    statistics_pass: float = 0.0
    cut_pass: float = 0.0
    curves: list[SiteCurve] | None = None
    plan: Allocation | None = None
    blocks: dict | None = None


def run_passes(engine: StreamingEngine, make_engine, model, adapter, calib, config: PruneConfig, rules: WidthRules) -> Passes:
    """Blocks (alone, or the candidate search with units), or units with uniform or global allocation."""
    start = time.perf_counter()
    if "blocks" in config.targets and len(config.targets) > 1:
        best, comparison = search_blocks_and_units(model, adapter, make_engine, calib, config, rules)
        return Passes(best.model, best.records, statistics_pass=time.perf_counter() - start, blocks=comparison)
    if "blocks" in config.targets:
        similarity = engine.score_blocks(calib)
        params = [count_parameters(layer) for layer in adapter.layers(model)]
        removed = choose_blocks(similarity, params, config.sparsity * sum(params))
        remove_blocks(model, adapter, removed)
        kept = [i for i in range(len(params)) if i not in set(removed)]
        records = [{"layer": new, "source_layer": old} for new, old in enumerate(kept)]
        return Passes(model, records, statistics_pass=time.perf_counter() - start,
                      blocks={"similarity": [round(v, 6) for v in similarity], "removed": removed})
    curves, plan = None, None
    if config.resolved_allocation == "global":
        curves = engine.collect_curves(calib, rules)
        plan = allocate_per_budget(curves, config)
        engine.steps_for = lambda site: plan.steps[(site.index, site.kind)]
    else:
        engine.steps_for = lambda site: nearest_steps(site, uniform_target(site, config), rules)
    statistics_pass = time.perf_counter() - start
    records = engine.run(calib)
    return Passes(model, records, statistics_pass, time.perf_counter() - start - statistics_pass, curves, plan)


def shape_model(model_config, auto_class: str = "AutoModelForCausalLM", trust_remote_code: bool = False) -> PreTrainedModel:
    """The model built on the meta device: its shapes, no weights (for checks before loading)."""
    import transformers

    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(model_config, trust_remote_code=trust_remote_code)


def uniform_target(site, config: PruneConfig) -> float:
    """Parameters a site should lose under uniform allocation."""
    if config.layer_sparsity and site.index in config.layer_sparsity:
        return config.sparsity_of_layer(site.index) * site.num_params()
    return config.target_sparsity(site.kind) * site.num_params()


def allocate_per_budget(curves: list[SiteCurve], config: PruneConfig) -> Allocation:
    """One global threshold for all targets, or one per target with sparsity_per_target."""
    groups = {t: [c for c in curves if c.kind == t] for t in config.targets} if config.sparsity_per_target else {"all": curves}
    steps, thresholds, target, removed = {}, {}, 0.0, 0
    for name, group in groups.items():
        budget = (config.target_sparsity(name) if name != "all" else config.sparsity) * sum(c.total_params for c in group)
        found = allocate_global(group, budget)
        steps.update(found.steps)
        thresholds[name] = found.threshold
        target, removed = target + budget, removed + found.removed_params
    return Allocation(steps, thresholds if len(thresholds) > 1 else thresholds.get("all"), target, removed)


def allocation_report(config: PruneConfig, plan: Allocation | None, curves: list[SiteCurve] | None) -> dict:
    report = {"mode": config.resolved_allocation, "round_to": config.round_to, "min_width": config.min_width,
              "ordering": config.ordering, "reconstruct": config.reconstruct}
    if plan is not None:
        report.update(threshold=plan.threshold, target_params_removed=round(plan.target_params), planned_params_removed=plan.removed_params,
                      curves={f"{c.layer}.{c.kind}": _downsample(c.retained()) for c in curves})
    return report


def _downsample(values: list[float], points: int = 65) -> list[float]:
    """Retained fraction after s removals, at ``points`` evenly spaced step counts."""
    if len(values) <= points:
        return [round(v, 5) for v in values]
    return [round(values[round(i * (len(values) - 1) / (points - 1))], 5) for i in range(points)]


def preflight(adapter, shapes: PreTrainedModel, config: PruneConfig, rules: WidthRules, num_tokens: int) -> None:
    """Checks on shapes only, before any weights load: reachable budgets, rank, budgets below one step."""
    layers = adapter.layers(shapes)
    sites = [site for i, layer in enumerate(layers) for site in adapter.sites(layer, i, config.targets, shapes.config, config.gqa_mode)]
    for target in (t for t in config.targets if t != "blocks"):
        own = [site for site in sites if site.kind == target]
        total = sum(site.num_params() for site in own)
        reachable = sum(site.params_removed(max(rules.allowed_steps(site))) for site in own)
        budget = config.target_sparsity(target) * total
        if budget > reachable + max(site.params_per_step() for site in own):
            raise ValueError(
                f"the budget cannot be met: {config.target_sparsity(target):.0%} of {target} is {budget:,.0f} parameters, "
                f"but with min_width={config.min_width!r} and round_to={config.round_to!r} at most {reachable:,} "
                f"({reachable / total:.0%}) can be removed; lower the sparsity or relax min_width / round_to"
            )
    if sites:
        preflight_warnings(sites[: len(config.targets)], config, rules, num_tokens)


VOLATILE_CONFIG_KEYS = ("dtype", "torch_dtype", "transformers_version", "architectures", "_name_or_path", "auto_map")


def architecture(model_config) -> dict:
    """The config fields that define the model's shapes (not how or where it was loaded)."""
    return {k: v for k, v in model_config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS and not k.startswith("_")}


def preflight_warnings(sites, config: PruneConfig, rules: WidthRules, num_tokens: int) -> None:
    """Warn (before the long work) about rank-deficient statistics and budgets too small for one step."""
    widest = max(sites, key=lambda site: site.num_units)
    if num_tokens < widest.num_units:
        _warn(RankDeficientCalibrationWarning,
              f"calibration has {num_tokens} tokens but the widest site ({widest.kind}, {widest.num_units} units) needs at "
              f"least {widest.num_units} for full-rank statistics: damping keeps them usable, but the ordering and "
              f"reconstruction are poorly determined; use num_samples x seq_len >= {widest.num_units}")
    for site in sites if config.resolved_allocation == "uniform" else []:
        if config.sparsity > 0 and nearest_steps(site, config.target_sparsity(site.kind) * site.num_params(), rules) == 0:
            step = site.params_removed(1) / site.num_params()
            _warn(UserWarning, f"sparsity {config.sparsity:.0%} of {site.kind} rounds to nothing per layer: one removal step "
                               f"takes {step:.0%} of a layer's {site.kind} parameters; raise the sparsity for this target")


def _warn(category: type[Warning], message: str) -> None:
    warnings.warn(message, category, stacklevel=4)
    logger.warning(message)


class RankDeficientCalibrationWarning(UserWarning):
    """Calibration tokens are fewer than the units of a site."""


def _is_pixel_values(spec: Any) -> bool:
    return isinstance(spec, torch.Tensor) or (isinstance(spec, dict) and "pixel_values" in spec)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@accepts_recipe
def prune(
    model: str | PreTrainedModel,
    tokenizer: Any = None,
    method: str = "snp",
    sparsity: float = 0.3,
    targets: Sequence[str] | str = ("mlp",),
    calibration: Any = "wikitext2",
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    device: str | torch.device | None = None,
    output_dir: str | None = None,
    *,
    image_processor: Any = None,
    batch_size: int = 8,
    damping: float = 1e-6,
    add_bias: bool | None = None,
    layer_sparsity: Mapping[int, float] | Sequence[float] | None = None,
    gqa_mode: str = "per_group",
    allocation: str | None = None,
    sparsity_per_target: Mapping[str, float] | None = None,
    round_to: int | Mapping[str, int] | None = None,
    min_width: int | Mapping[str, int] | None = None,
    ordering: str = "zca",
    reconstruct: bool = True,
    activation_device: str | torch.device | None = None,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    device_map: Any = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in one shot and return the smaller model with a report.

    Args:
        model: Hub id, local directory, ``.gguf`` path or ``"smollm2-demo"``; or a loaded
            PreTrainedModel (pruned in place, accelerate placement and offload kept; with
            "blocks" among several targets the candidates are pruned copies and the winner is
            returned as ``result.model``).
        tokenizer: loaded from ``model`` when it is a string; needed for text calibration.
        image_processor: for ViT/DeiT, turns calibration images into pixel values; loaded from
            ``model`` (``AutoImageProcessor``) when it is a string; saved with the result.
        method: ``"snp"`` (least-squares reconstruction), ``"vbp"`` (variance + mean shift)
            or ``"random"`` (baseline).
        sparsity: fraction of the targeted modules' parameters to remove, in [0, 1).
        targets: which units to prune: ``"mlp"`` (MLP neurons), ``"heads"`` (attention heads),
            ``"blocks"`` (whole decoder blocks), or several. With "blocks" the budget is
            ``sparsity`` of all decoder-layer parameters, and with unit targets as well, block
            removal, unit removal and a mix are compared by final-state CKA (best kept).
        calibration: text models: dataset name (``wikitext2``, ``c4``, ``wikitext2-local``),
            .txt/.jsonl path, list of strings, ``datasets.Dataset``, or LongTensor [N, L] of token
            ids. Image models: a ``datasets.Dataset`` with an image column, a folder of images, a
            list of PIL images, a pixel_values tensor [N, C, H, W], or a Hub dataset id
            ("name" or "name:split"); ``num_samples`` images are drawn (seeded).
        num_samples, seq_len, seed: calibration windows drawn from text sources.
        device: execution device for each block (default: the GPU when there is one).
        output_dir: when set, save model, tokenizer and ``hf_snp_report.json`` there.
        batch_size: calibration windows per forward call.
        damping: lambda of ``lambda * mean(diag)`` added before factoring statistics.
        add_bias: allow adding a bias to a consumer that has none (None: the method decides;
            VBP adds one for its mean shift, SNP keeps the stock architecture).
        layer_sparsity: per-layer override of ``sparsity`` ({layer: fraction} or a list).
        allocation: ``"uniform"`` (default): every layer loses the same fraction (one pass);
            ``"global"``: one threshold on the cumulative-variance curves of all sites decides
            each site's width, searched so the removed parameters meet the budget (two passes:
            dense statistics, then the cuts).
        sparsity_per_target: fix each target's budget separately, e.g. {"mlp": 0.3, "heads": 0.1}.
        round_to: widths a multiple of this (MLP neurons; or {"mlp": 64, "heads": 2}).
        min_width: the fewest units a site keeps (MLP neurons; or {"mlp": 256, "heads": 1}).
        ordering: SNP ablation: "zca" (default), "natural", "random", "output_aware".
        reconstruct: SNP ablation: False skips the least-squares reconstruction (means only).
        gqa_mode: for grouped-query attention, ``"per_group"`` (default) removes the same
            number of query heads from every KV group and keeps all k/v heads;
            ``"kv_groups"`` removes whole KV groups with their query heads (smaller KV cache,
            coarser steps).
        activation_device: where calibration hidden states wait between blocks
            (default: the execution device).
        gguf_file, dtype, device_map, max_memory, offload_folder, trust_remote_code:
            passed to ``from_pretrained`` when ``model`` is a string.
        overwrite: allow replacing a non-empty ``output_dir``.
        checkpoint_dir: save the state after each block there (pruned blocks and records).
        resume: continue the run checkpointed in ``checkpoint_dir`` (same model, calibration
            and settings); the result is bit-identical to an uninterrupted run.
        progress: show tqdm progress bars.
        push_to_hub: a Hub repository ("user/name") to upload the saved model, tokenizer,
            report and generated model card to (saved to a temporary directory when no
            ``output_dir`` is given); ``private`` makes a new repository private.
        recipe: a YAML file (or dict) of these arguments; arguments passed here override it.
    """
    start = time.perf_counter()
    config = PruneConfig(
        method=method, sparsity=sparsity, targets=targets, num_samples=num_samples, seq_len=seq_len, seed=seed,
        batch_size=batch_size, damping=damping, add_bias=add_bias, layer_sparsity=layer_sparsity, gqa_mode=gqa_mode,
        allocation=allocation, sparsity_per_target=dict(sparsity_per_target) if sparsity_per_target else None,
        round_to=round_to, min_width=min_width, ordering=ordering, reconstruct=reconstruct,
    )
    config.validate()
    if output_dir is not None:
        prepare_output_dir(output_dir, overwrite)
    if push_to_hub is not None and "/" not in push_to_hub:
        raise ValueError(f"push_to_hub={push_to_hub!r} should be a repository id like 'user/name'")
    source = None
    rules = WidthRules.build(round_to, min_width)
    if isinstance(model, str):
        source = ModelSource.parse(model, gguf_file)
        model_config = load_config(source, trust_remote_code)
    elif isinstance(model, PreTrainedModel):
        model_config = model.config
    else:
        raise TypeError(f"model must be a Hub id, a local path or a PreTrainedModel, got {type(model).__name__}")
    adapter = get_adapter(model_config)
    check_modality(calibration, adapter.modality, adapter.family)
    if source is not None and adapter.modality == "image" and image_processor is None:
        image_processor = _preprocessor_if_available("image", source, trust_remote_code, not _is_pixel_values(calibration))
    if source is not None and adapter.modality == "text" and tokenizer is None:
        tokenizer = _preprocessor_if_available("text", source, trust_remote_code, is_text_calibration(calibration))
    calib = load_calibration_for(adapter, model_config, calibration, tokenizer, image_processor, config)
    shapes = shape_model(model_config, adapter.auto_class, trust_remote_code) if source is not None else model
    config.validate(num_layers=len(adapter.layers(shapes)))
    preflight(adapter, shapes, config, rules, calib.num_tokens)
    checkpoint = None
    if checkpoint_dir is not None and "blocks" in config.targets:
        raise ValueError("checkpoint_dir / resume cover the per-block unit pruning; block pruning is one dense pass "
                         "(plus the candidates' passes) and is not checkpointed: drop checkpoint_dir")
    if checkpoint_dir is not None:
        digest = fingerprint(config.to_dict(), architecture(model_config), *calib.tensors())
        checkpoint = Checkpoint.open(checkpoint_dir, digest, resume)
    elif resume:
        raise ValueError("resume=True needs the checkpoint_dir of the run to resume")
    if source is not None:
        model = load_model(source, dtype, device_map, max_memory, offload_folder, trust_remote_code, adapter.auto_class)
    if has_offloaded_weights(model):
        keep_freed_blocks_out_of_memory()
    device = torch.device(device) if device is not None else default_device()
    store = torch.device(activation_device) if activation_device is not None else device

    params_before = count_parameters(model)
    options = MethodOptions(damping=damping, seed=seed, ordering=ordering, reconstruct=reconstruct)

    def make_engine(target_model, targets, with_checkpoint=None):
        return StreamingEngine(
            target_model, adapter, get_method(method), options, targets, steps_for=None, add_bias=add_bias, device=device,
            store=store, batch_size=batch_size, gqa_mode=gqa_mode, progress=progress, checkpoint=with_checkpoint,
        )

    engine = make_engine(model, config.targets, checkpoint)
    passes = run_passes(engine, make_engine, model, adapter, calib, config, rules)
    model, records = passes.model, passes.records
    save_format = finalize_architecture(model, adapter, records)
    params_after = count_parameters(model)
    report = PruneReport({
        "schema_version": SCHEMA_VERSION,
        "hf_snp_version": __version__,
        "base_model": source.path if source else getattr(model.config, "_name_or_path", None),
        "model_type": model.config.model_type,
        "save_format": save_format,
        **config.to_dict(),
        "calibration": calib.source,
        "calibration_tokens": calib.num_tokens,
        "device": str(device),
        "output_dir": output_dir,
        "params_before": params_before,
        "params_after": params_after,
        "params_removed": params_before - params_after,
        "layers": records,
        "allocation": allocation_report(config, passes.plan, passes.curves),
        **({"blocks": passes.blocks} if passes.blocks else {}),
        "timings_s": {**{k: round(v, 4) for k, v in engine.timer.seconds.items()},
                      "statistics_pass": round(passes.statistics_pass, 4), "cut_pass": round(passes.cut_pass, 4),
                      "total": round(time.perf_counter() - start, 4)},
        "metrics": {},
    })
    logger.info("pruned %s: %d -> %d parameters", report["base_model"], params_before, params_after)
    result = PruneResult(model, report, tokenizer, image_processor)
    if output_dir is not None:
        result.save(output_dir, overwrite=overwrite)
    if push_to_hub is not None:
        result.push_to_hub(push_to_hub, private=private, folder=output_dir)
    return result
