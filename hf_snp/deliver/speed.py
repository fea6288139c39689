"""How fast a model runs: prefill throughput, time to first token, decode speed, KV-cache size.

One measurement runs every probe once on fixed random token ids; ``compare_speed`` interleaves the
measurements of several models (so that a slow spell of the machine hits all of them) and reports
medians and speed-ups against the first. The benchmark (``benchmarks/inference.py``), ``hf-snp prune
--measure-speed`` and ``hf-snp eval --speed`` all measure this way.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..passes.placement import input_device

logger = logging.getLogger("hf_snp")


@dataclass(frozen=True)
class SpeedProbe:
    """What one measurement runs."""

    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 3
    seed: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(device: torch.device, call) -> float:
    _sync(device)
    start = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - start


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters as stored: a quantized tensor (torchao) counts its packed data and scales."""
    total = 0
    for param in model.parameters():
        inner = [getattr(param, name) for name in getattr(param, "tensor_data_names", [])]
        total += sum(t.numel() * t.element_size() for t in [t for t in inner if isinstance(t, torch.Tensor)] or [param])
    return total


def _cache_bytes(cache) -> int | None:
    """Bytes held by a transformers KV cache (its per-layer key and value tensors)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def measure_once(model: nn.Module, probe: SpeedProbe = SpeedProbe()) -> dict:
    """One run of every probe: prefill tokens/s per batch size (no cache), time to first token and decode
    tokens/s of greedy generation at batch 1 (KV cache on), KV-cache bytes per token, weight bytes."""
    device = input_device(model)
    vocab = model.get_input_embeddings().num_embeddings
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None and probe.prompt_len + probe.new_tokens > limit:  # the model's positions end there
        probe = dataclasses.replace(probe, prompt_len=max(limit - probe.new_tokens, 1))
    generator = torch.Generator().manual_seed(probe.seed)
    ids = torch.randint(0, vocab, (max(probe.batch_sizes), probe.prompt_len), generator=generator).to(device)
    result: dict = {}
    for batch in probe.batch_sizes:
        seconds = _seconds(device, lambda: model(ids[:batch], use_cache=False))
        result[f"prefill_b{batch}_tokens_per_s"] = batch * probe.prompt_len / seconds
    prompt = ids[:1]
    ttft = _seconds(device, lambda: model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False))
    total = _seconds(device, lambda: model.generate(prompt, max_new_tokens=probe.new_tokens,
                                                    min_new_tokens=probe.new_tokens, do_sample=False))
    result["ttft_s"] = ttft
    result["decode_tokens_per_s"] = (probe.new_tokens - 1) / max(total - ttft, 1e-9)
    cache = _cache_bytes(model(prompt, use_cache=True).past_key_values)
    result["kv_cache_bytes_per_token"] = None if cache is None else cache / probe.prompt_len
    result["weight_bytes"] = weight_bytes(model)
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def compare_speed(models: dict[str, nn.Module], probe: SpeedProbe = SpeedProbe(), warmup: bool = True,
                  baseline: dict | None = None) -> dict:
    """Medians of ``probe.repeats`` interleaved measurements per model, each with its speed-ups (>1: faster)
    against ``baseline`` (the medians of an earlier measurement), else against the first model."""
    if warmup:
        for model in models.values():
            measure_once(model, dataclasses.replace(probe, new_tokens=2))
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(probe.repeats):
        for name, model in models.items():
            device = input_device(model)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs[name].append(measure_once(model, probe))
    medians = {name: {key: _median([run[key] for run in values]) for key in values[0]} for name, values in runs.items()}
    reference = baseline if baseline is not None else medians[next(iter(models))]
    for values in medians.values():
        add_speedups(values, reference, probe)
    first = next(iter(models.values()))
    return {"device": _device_name(first), "dtype": str(first.dtype), "probe": dataclasses.asdict(probe),
            "models": medians}


def add_speedups(values: dict, baseline: dict, probe: SpeedProbe) -> dict:
    """``values`` with its prefill, decode and time-to-first-token speed-ups against ``baseline``."""
    values["prefill_speedup"] = {f"b{b}": _ratio(values, baseline, f"prefill_b{b}_tokens_per_s")
                                 for b in probe.batch_sizes}
    values["decode_speedup"] = _ratio(values, baseline, "decode_tokens_per_s")
    values["ttft_speedup"] = _ratio(baseline, values, "ttft_s")
    return values


def _median(values: list):
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(numerator: dict, denominator: dict, key: str) -> float | None:
    if numerator.get(key) is None or not denominator.get(key):
        return None
    return numerator[key] / denominator[key]


def _device_name(model: nn.Module) -> str:
    device = input_device(model)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def speed_probe(model: nn.Module, baseline: dict | None = None, probe: SpeedProbe = SpeedProbe()) -> dict | None:
    """The quick probe of ``prune(measure_speed=True)``: this model's medians on its device (with speed-ups
    against ``baseline``, the probe of the dense model before pruning); None, with a warning, for a model
    with offloaded weights, whose speed is the offloading's."""
    from ..passes.placement import has_offloaded_weights

    if has_offloaded_weights(model):
        logger.warning("measure_speed: the model has offloaded weights; its speed would be the offload's: not measured")
        return None
    measured = compare_speed({"model": model}, probe, baseline=baseline)
    return {"device": measured["device"], "dtype": measured["dtype"], **measured["models"]["model"]}
