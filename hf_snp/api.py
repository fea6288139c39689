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
from .checkpoint import Checkpoint, fingerprint
from .config import PruneConfig
from .engine import StreamingEngine
from .hub import push_folder
from .loading import ModelSource, load_config, load_model, load_tokenizer
from .methods import MethodOptions, get_method
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

    def save(self, output_dir: str, overwrite: bool = False) -> None:
        save_pruned(self.model, self.tokenizer, self.report, output_dir, overwrite)

    def push_to_hub(self, repo_id: str, private: bool = False, folder: str | None = None, token: str | None = None) -> str:
        """Upload the pruned model with its tokenizer, report and model card; returns the commit URL."""
        if folder is not None:
            return push_folder(folder, repo_id, private=private, token=token)
        with tempfile.TemporaryDirectory(prefix="hf_snp_push_") as staging:
            target = os.path.join(staging, "model")
            self.save(target)
            return push_folder(target, repo_id, private=private, token=token)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once), offloaded ones included."""
    return sum(p.numel() for p in model.parameters())


def _tokenizer_if_available(source: ModelSource, trust_remote_code: bool, needed: bool):
    try:
        return load_tokenizer(source, trust_remote_code)
    except (OSError, ValueError) as error:
        if needed:
            raise ValueError(f"text calibration needs a tokenizer, and none loads from {source.path!r} ({error}); "
                             "pass tokenizer=... or token-id calibration") from error
        logger.info("no tokenizer loads from %s; calibration is token ids, so none is needed", source.path)
        return None


VOLATILE_CONFIG_KEYS = ("dtype", "torch_dtype", "transformers_version", "architectures", "_name_or_path", "auto_map")


def architecture(model_config) -> dict:
    """The config fields that define the model's shapes (not how or where it was loaded)."""
    return {k: v for k, v in model_config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS and not k.startswith("_")}


def preflight_warnings(adapter, model, config: PruneConfig, num_tokens: int) -> None:
    """Warn (before the long work) about rank-deficient statistics and budgets too small for one step."""
    sites = adapter.sites(adapter.layers(model)[0], 0, config.targets, model.config, config.gqa_mode)
    widest = max(sites, key=lambda site: site.num_units)
    if num_tokens < widest.num_units:
        _warn(RankDeficientCalibrationWarning,
              f"calibration has {num_tokens} tokens but the widest site ({widest.kind}, {widest.num_units} units) needs at "
              f"least {widest.num_units} for full-rank statistics: damping keeps them usable, but the ordering and "
              f"reconstruction are poorly determined; use num_samples x seq_len >= {widest.num_units}")
    for site in sites:
        if config.sparsity > 0 and site.steps_for_sparsity(config.sparsity) == 0:
            step = site.params_removed(1) / site.num_params()
            _warn(UserWarning, f"sparsity {config.sparsity:.0%} of {site.kind} rounds to nothing per layer: one removal step "
                               f"takes {step:.0%} of a layer's {site.kind} parameters; raise the sparsity for this target")


def _warn(category: type[Warning], message: str) -> None:
    warnings.warn(message, category, stacklevel=4)
    logger.warning(message)


class RankDeficientCalibrationWarning(UserWarning):
    """Calibration tokens are fewer than the units of a site."""


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
    batch_size: int = 8,
    damping: float = 1e-6,
    add_bias: bool | None = None,
    layer_sparsity: Mapping[int, float] | Sequence[float] | None = None,
    gqa_mode: str = "per_group",
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
            PreTrainedModel (pruned in place, accelerate placement and offload kept).
        tokenizer: loaded from ``model`` when it is a string; needed for text calibration.
        method: ``"snp"`` (least-squares reconstruction), ``"vbp"`` (variance + mean shift)
            or ``"random"`` (baseline).
        sparsity: fraction of the targeted modules' parameters to remove, in [0, 1).
        targets: which units to prune: ``"mlp"`` (MLP neurons), ``"heads"`` (attention heads),
            or both; each target loses ``sparsity`` of its parameters in every layer.
        calibration: dataset name (``wikitext2``, ``c4``, ``wikitext2-local``), .txt/.jsonl
            path, list of strings, ``datasets.Dataset``, or LongTensor [N, L] of token ids.
        num_samples, seq_len, seed: calibration windows drawn from text sources.
        device: execution device for each block (default: the GPU when there is one).
        output_dir: when set, save model, tokenizer and ``hf_snp_report.json`` there.
        batch_size: calibration windows per forward call.
        damping: lambda of ``lambda * mean(diag)`` added before factoring statistics.
        add_bias: allow adding a bias to a consumer that has none (None: the method decides;
            VBP adds one for its mean shift, SNP keeps the stock architecture).
        layer_sparsity: per-layer override of ``sparsity`` ({layer: fraction} or a list).
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
    config = PruneConfig(method, sparsity, targets, num_samples, seq_len, seed, batch_size, damping, add_bias, layer_sparsity, gqa_mode)
    config.validate()
    if output_dir is not None:
        prepare_output_dir(output_dir, overwrite)
    if push_to_hub is not None and "/" not in push_to_hub:
        raise ValueError(f"push_to_hub={push_to_hub!r} should be a repository id like 'user/name'")
    source = None
    if isinstance(model, str):
        source = ModelSource.parse(model, gguf_file)
        adapter = get_adapter(load_config(source, trust_remote_code))
        if tokenizer is None:
            tokenizer = _tokenizer_if_available(source, trust_remote_code, needed=is_text_calibration(calibration))
    elif isinstance(model, PreTrainedModel):
        adapter = get_adapter(model.config)
    else:
        raise TypeError(f"model must be a Hub id, a local path or a PreTrainedModel, got {type(model).__name__}")
    calib = load_calibration(calibration, tokenizer, num_samples, seq_len, seed)
    checkpoint = None
    if checkpoint_dir is not None:
        model_config = load_config(source, trust_remote_code) if source is not None else model.config
        digest = fingerprint(config.to_dict(), architecture(model_config), calib.input_ids, calib.attention_mask)
        checkpoint = Checkpoint.open(checkpoint_dir, digest, resume)
    elif resume:
        raise ValueError("resume=True needs the checkpoint_dir of the run to resume")
    if source is not None:
        model = load_model(source, dtype, device_map, max_memory, offload_folder, trust_remote_code)
    config.validate(num_layers=len(adapter.layers(model)))
    preflight_warnings(adapter, model, config, calib.num_tokens)
    device = torch.device(device) if device is not None else default_device()
    store = torch.device(activation_device) if activation_device is not None else device

    params_before = count_parameters(model)
    engine = StreamingEngine(
        model, adapter, get_method(method), MethodOptions(damping=damping, seed=seed), config.targets,
        steps_for=lambda site: site.steps_for_sparsity(config.sparsity_of_layer(site.index)),
        add_bias=add_bias, device=device, store=store, batch_size=batch_size, gqa_mode=gqa_mode, progress=progress,
        checkpoint=checkpoint,
    )
    records = engine.run(calib)
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
        "timings_s": {**{k: round(v, 4) for k, v in engine.timer.seconds.items()}, "total": round(time.perf_counter() - start, 4)},
        "metrics": {},
    })
    logger.info("pruned %s: %d -> %d parameters", report["base_model"], params_before, params_after)
    result = PruneResult(model, report, tokenizer)
    if output_dir is not None:
        result.save(output_dir, overwrite=overwrite)
    if push_to_hub is not None:
        result.push_to_hub(push_to_hub, private=private, folder=output_dir)
    return result
