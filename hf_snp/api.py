"""The public entry point, hf_snp.prune, as the table of contents of a pruning run:
resolve (everything before weights load), load, run the passes, finalize, deliver; and the demo (run_demo), the
same phases on the packaged SmolLM2, compared with the dense model before and after."""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import textwrap
import time
from dataclasses import dataclass
from typing import Any, Callable

from transformers import PreTrainedModel

from . import parallel
from .config import PruneConfig, config_fields, field_default
from .deliver.push import push_folder
from .deliver.quantize import quantize_result
from .deliver.report import PruneReport
from .deliver.save_format import finalize_architecture
from .deliver.saving import save_pruned
from .deliver.speed import speed_probe
from .demo import DEMO_MODEL, DEMO_PROMPTS, EVAL_DATASET, EVAL_SEQ_LEN, EVAL_WINDOWS, demo_settings, print_summary
from .evaluation.reference import FILES as REFERENCE_FILES
from .evaluation.reference import DenseReference, evaluate, shipped_prompts
from .passes.placement import has_offloaded_weights, keep_freed_blocks_out_of_memory
from .passes.run import Passes, run_passes
from .setup.calibration import load_calibration
from .setup.loading import load_model, model_license
from .setup.recipes import accepts_recipe
from .setup.resolve import PruneRun, resolve
from .units.allocation import default_multiple, describe_allocation
from .units.sites import count_parameters

logger = logging.getLogger("hf_snp")


def with_config_options(func: Callable) -> Callable:
    """Give ``func(..., **options)`` the PruneConfig fields as keyword-only parameters in its signature
    and their help in its docstring (the options are declared once, in PruneConfig)."""
    signature = inspect.signature(func)
    parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    parameters += [inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=field_default(spec),
                                     annotation=spec.type) for spec in config_fields().values()]
    func.__signature__ = signature.replace(parameters=parameters)
    lines = [f"        {spec.name}: " + textwrap.fill(spec.metadata["help"], 100, subsequent_indent=" " * 12).lstrip()
             for spec in config_fields().values()]
    func.__doc__ = (func.__doc__ or "").rstrip() + "\n\n    PruneConfig options:\n" + "\n".join(lines) + "\n"
    return func


@dataclass
class PruneResult:
    """The pruned model (a PreTrainedModel, pruned in place) and the run's report."""

    model: PreTrainedModel
    report: PruneReport
    tokenizer: Any = None
    image_processor: Any = None
    reference: DenseReference | None = None  # the dense reference of evaluate='dense', saved with the model

    def save(self, output_dir: str, overwrite: bool = False) -> None:
        save_pruned(self.model, self.tokenizer, self.report, output_dir, overwrite,
                    image_processor=self.image_processor)

    def push_to_hub(self, repo_id: str, private: bool = False, folder: str | None = None,
                    token: str | None = None) -> str:
        """Upload the pruned model with its tokenizer, report and model card; returns the commit URL."""
        if folder is not None:
            return push_folder(folder, repo_id, private=private, token=token)
        with tempfile.TemporaryDirectory(prefix="hf_snp_push_") as staging:
            target = os.path.join(staging, "model")
            self.save(target)
            return push_folder(target, repo_id, private=private, token=token)


@accepts_recipe
@with_config_options
def prune(model: str | PreTrainedModel, tokenizer: Any = None, *, image_processor: Any = None,
          **options: Any) -> PruneResult:
    """Prune ``model`` in one shot and return the smaller model with a report.

    Args:
        model: Hub id, local directory, ``.gguf`` path or ``"smollm2-demo"``; or a loaded
            PreTrainedModel (pruned in place, accelerate placement and offload kept; with
            "blocks" among several targets the candidates are pruned copies and the winner is
            returned as ``result.model``).
        tokenizer: loaded from ``model`` when it is a string; needed for text calibration.
        image_processor: for ViT/DeiT, turns calibration images into pixel values; loaded from
            ``model`` (``AutoImageProcessor``) when it is a string; saved with the result.
        recipe: a YAML file (or dict) of these arguments; arguments passed here override it.
        options: the fields of :class:`hf_snp.PruneConfig`, listed below.
    """
    start = time.perf_counter()
    run = join_ranks(resolve(model, tokenizer, image_processor, PruneConfig.from_options(options)))
    result = prune_loaded(run, load(run), start)
    deliver(run.config, result)
    return result


def written_calibration(run: PruneRun, model: PreTrainedModel) -> None:
    """``calibration="self"`` (alone or in a mixture): the dense model writes it now, before any cut; with several
    ranks rank 0 writes it and the others receive it (docs/design.md §1.3)."""
    if run.calib is not None:
        return
    config, calib = run.config, None
    if parallel.is_main():
        calib = load_calibration(config.calibration, run.tokenizer, config.num_samples, config.seq_len, config.seed,
                                 model=model, batch_size=config.batch_size, progress=config.progress)
    run.calib = parallel.broadcast_object(calib, 0)


def dense_reference(run: PruneRun, model: PreTrainedModel) -> DenseReference | None:
    """The dense model's reference for ``evaluate=``, before any cut: loaded from the folder ``evaluate`` names when
    it holds one, else computed and saved there (``'dense'``: under output_dir/dense_reference). Rank 0 only."""
    where = run.config.evaluate
    if where is None or not parallel.is_main():
        return None
    if where == "dense":
        where = None if run.config.output_dir is None else os.path.join(run.config.output_dir, "dense_reference")
    if where is not None and all(os.path.exists(os.path.join(where, name)) for name in REFERENCE_FILES):
        return DenseReference.load(where)
    reference = DenseReference.compute(model, run.tokenizer, progress=run.config.progress)
    if where is not None and where != os.path.join(run.config.output_dir or "", "dense_reference"):
        reference.save(where)  # output_dir's own copy is written with the model (deliver)
    return reference


def join_ranks(run: PruneRun) -> PruneRun:
    """Under torchrun / accelerate launch: join the process group, each rank on its own device (docs/design.md
    §8.7). A run without a process group is returned unchanged."""
    if parallel.init_from_environment(run.device):
        run.device, run.store = parallel.local_device(run.device), parallel.local_device(run.store)
    return run


def prune_loaded(run: PruneRun, model: PreTrainedModel, start: float) -> PruneResult:
    """The work after loading: written calibration, the dense reference, the passes, the report, the comparison
    with the dense model, and quantization and speed probes when asked (nothing is saved: :func:`deliver` does)."""
    params_before = count_parameters(model)
    written_calibration(run, model)
    reference = dense_reference(run, model)
    dense_speed = speed_probe(model) if run.config.measure_speed else None
    passes = run_passes(run, model)
    result = finalize(run, passes, params_before, time.perf_counter() - start)
    if reference is not None:
        result.report["metrics"].update(evaluate(result.model, reference, run.tokenizer,
                                                 progress=run.config.progress))
        result.reference = reference
    if run.config.quantize is not None:
        quantize_result(result, run.config.quantize)
    if dense_speed is not None:
        result.report["speed"] = speed_probe(result.model, baseline=dense_speed)
    return result


def load(run: PruneRun) -> PreTrainedModel:
    """The model's weights: loaded from the source, or the caller's model made ready to prune and save."""
    config = run.config
    if run.source is None:
        model = run.model
    else:
        model = load_model(run.source, config.dtype, config.device_map, config.max_memory, config.offload_folder,
                           config.trust_remote_code, run.adapter.auto_class)
    if has_offloaded_weights(model):
        keep_freed_blocks_out_of_memory()
    return model


def finalize(run: PruneRun, passes: Passes, params_before: int, seconds: float) -> PruneResult:
    """Fix the architecture to the pruned shapes and build the report."""
    save_format = finalize_architecture(passes.model, run.adapter, passes.records)
    config = run.config
    base_model, model_name = run.model_names()
    settings = config.settings()
    timings = {**passes.timings, "dense_pass": passes.dense_pass, "cut_pass": passes.cut_pass, "total": seconds}
    if getattr(run.calib, "generation_seconds", 0.0):  # calibration="self": the dense model writing it
        timings["calibration_generation"] = run.calib.generation_seconds
    report = PruneReport.build(
        base_model=base_model, model_name=model_name, model_type=passes.model.config.model_type,
        save_format=save_format, settings=settings,
        options={k: v for k, v in config.to_dict().items() if k not in settings},
        calibration=run.calib.source, calibration_tokens=run.calib.num_tokens, device=str(run.device),
        output_dir=config.output_dir, params_before=params_before, params_after=count_parameters(passes.model),
        layers=passes.records, allocation=describe_allocation(config, passes.plan, passes.curves),
        blocks=passes.blocks, timings=timings)
    report.update(resolved_settings(config, report["layers"]), license=model_license(run.source))
    if parallel.world_size() > 1:  # each phase's seconds on every rank
        per_rank = parallel.all_gather_objects({k: round(v, 4) for k, v in passes.timings.items()})
        report.update(world_size=parallel.world_size(), timings_per_rank_s=per_rank)
    logger.info("pruned %s: %d -> %d parameters", report["model_name"], report["params_before"], report["params_after"])
    return PruneResult(passes.model, report, run.tokenizer, run.image_processor)


def resolved_settings(config: PruneConfig, layers: list[dict]) -> dict:
    """The settings as the run used them, for the report's top level (beside the calibration source and the
    allocation mode): the SNP ordering and ridge that applied, and each target's width multiple (``round_to``;
    the default multiple of MLP widths from units.allocation where none was given)."""
    snp = config.method == "snp"
    given = config.round_to if isinstance(config.round_to, dict) else \
        ({} if config.round_to is None else {"mlp": config.round_to})
    round_to = {}
    for target in config.unit_targets:
        if target in given:
            round_to[target] = given[target]
        elif target == "mlp":
            widths = {r.get("mlp_width_before") or r.get("expert_width_before") for r in layers} - {None}
            multiples = sorted({default_multiple(width) for width in widths})
            round_to[target] = multiples[0] if len(multiples) == 1 else multiples
        else:
            round_to[target] = 1
    return {"ordering": config.resolved_ordering if snp else config.ordering,
            "ridge": config.resolved_ridge if snp and config.reconstruct else config.ridge,
            "round_to": round_to or config.round_to}


def deliver(config: PruneConfig, result: PruneResult) -> None:
    """Save to ``output_dir`` and push to the Hub, as asked: on rank 0 only when several processes run, the others
    waiting for its outcome (an error there is raised on every rank)."""
    error = None
    if parallel.is_main():
        try:
            if config.output_dir is not None:
                result.save(config.output_dir, overwrite=config.overwrite)
                if result.reference is not None and config.evaluate in ("dense", None):
                    result.reference.save(os.path.join(config.output_dir, "dense_reference"))
            if config.push_to_hub is not None:
                result.push_to_hub(config.push_to_hub, private=config.private, folder=config.output_dir)
        except Exception as failure:  # noqa: BLE001  (handed to every rank)
            error = failure
    parallel.raise_if_any_failed(error)


def run_demo(eval_windows: int = EVAL_WINDOWS, **options: Any) -> dict:
    """Prune the packaged SmolLM2 with ``options`` (PruneConfig fields, over ``DEMO_OVERRIDES``), compare it with
    the dense model (perplexity, KL, chat replies), print the comparison and save the result; returns the numbers."""
    run = resolve(DEMO_MODEL, None, None, PruneConfig.from_options(demo_settings(options, eval_windows)))
    config = run.config  # every refusal is behind us, and no weights have loaded
    print(f"Loading SmolLM2-135M-Instruct from {os.path.join(run.source.path, run.source.gguf_file)} "
          f"(dequantised to {config.dtype})")
    model = load(run)
    reference_start = time.perf_counter()
    reference = DenseReference.compute(model, run.tokenizer, EVAL_DATASET, eval_windows, EVAL_SEQ_LEN,
                                       prompts=shipped_prompts()[:DEMO_PROMPTS], progress=config.progress)
    reference_seconds = time.perf_counter() - reference_start
    ppl_before = reference.meta["dense_perplexity"]
    print(f"Dense perplexity on {eval_windows} x {EVAL_SEQ_LEN} WikiText-2 test tokens: {ppl_before:.2f}")
    start = time.perf_counter()
    result = prune_loaded(run, model, start)
    seconds = time.perf_counter() - start
    evaluation_start = time.perf_counter()
    metrics = evaluate(result.model, reference, run.tokenizer, progress=config.progress)
    result.report["metrics"].update(metrics, dense_reference_s=reference_seconds,
                                    evaluation_s=time.perf_counter() - evaluation_start,
                                    perplexity_before=ppl_before, perplexity_after=metrics["perplexity_text"],
                                    perplexity_protocol=f"WikiText-2 test, the first {eval_windows} windows of "
                                                        f"{EVAL_SEQ_LEN} tokens")
    result.reference = reference
    deliver(config, result)
    result.report.plot(os.path.join(config.output_dir, "hf_snp_report.png"))
    print_summary(result.report, ppl_before, metrics["perplexity_text"], seconds)
    return {"ppl_before": ppl_before, "ppl_after": metrics["perplexity_text"], "seconds": seconds,
            "report": result.report}
