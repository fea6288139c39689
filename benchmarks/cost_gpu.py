"""The gpu part of benchmarks/cost.py: pruning OPT-1.3b- and Llama-7B-shaped models of random weights on a GPU, with
the phases (statistics, decide, cut), the peak GPU memory, and the host reads each site's decision makes.

    python benchmarks/cost.py --parts gpu --device cuda
    python benchmarks/cost.py --parts gpu --smoke          # tiny shapes on the CPU: checks that the part runs

Host reads: on CUDA, the synchronising calls that ``torch.cuda.set_sync_debug_mode`` reports inside each decide
(``.item()``, ``int()``, ``.tolist()``, device-to-host copies, ``nonzero``); on the CPU, their proxy (docs/design.md
§3.10): ``aten._local_scalar_dense`` and ``nonzero`` as torch dispatches them, and ``Tensor.tolist``.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from contextlib import contextmanager

import torch
from measure import model_bytes, sync
from torch.utils._python_dispatch import TorchDispatchMode

import hf_snp
from hf_snp.methods.snp import SNP

GPU_SHAPES = {
    "OPT-1.3b shape": ("opt", dict(vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                                   num_attention_heads=32, word_embed_proj_dim=2048, max_position_embeddings=2048)),
    "Llama-7B shape": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)),
}
SMOKE_SHAPES = {
    "OPT-1.3b shape, tiny": ("opt", dict(vocab_size=512, hidden_size=64, ffn_dim=256, num_hidden_layers=2,
                                         num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256)),
    "Llama-7B shape, tiny": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)),
}


# ops that read a device value on the host (the same as tests/test_batched_elimination.py): ``.item()`` and the like,
# ``nonzero``, and the error checks of linalg calls without ``_ex`` (eigh's inside its kernel)
HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten._linalg_check_errors.default, torch.ops.aten._linalg_eigh.default)


class _HostReads(TorchDispatchMode):
    """The CPU proxy of GPU synchronisations: ops that read a tensor's value on the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _counting(device: torch.device):
    """Yields a list that receives, on exit, the host reads made inside the block."""
    found: list[int] = []
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found.append(sum("synchroniz" in str(w.message) for w in caught))
        return
    tolist, lists = torch.Tensor.tolist, []
    torch.Tensor.tolist = lambda self: lists.append(1) or tolist(self)
    try:
        with _HostReads() as reads:
            yield found
    finally:
        torch.Tensor.tolist = tolist
    found.append(reads.count + len(lists))


@contextmanager
def decide_reads(device: torch.device):
    """While active, each SNP decide records (host reads, units removed) into the yielded list."""
    original, records = SNP.decide, []

    def decide(self, site, config):
        with _counting(device) as found:
            decision = original(self, site, config)
        records.append((found[0], len(decision.drop)))
        return decision

    SNP.decide = decide
    try:
        yield records
    finally:
        SNP.decide = original


def _random_model(family: str, dtype: torch.dtype, shape: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    torch.manual_seed(0)
    config = (LlamaConfig if family == "llama" else OPTConfig)(**shape, tie_word_embeddings=False)
    with torch.device("cpu"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _runs(family: str, size: int, device: torch.device, smoke: bool) -> list[tuple[str, dict]]:
    """Placements to measure: on the device; for Llama on a GPU also with max_memory below the model (offload)."""
    if device.type != "cuda":
        return [("on the CPU", dict(device_map={"": "cpu"}, device=device))]
    runs = [("on the GPU", dict(device_map={"": device.index or 0}, device=device))]
    if family == "llama" and not smoke:
        runs.append(("max_memory below the model: offloaded",
                     dict(device_map="auto", max_memory={device.index or 0: size // 2, "cpu": "100GiB"},
                          device=device)))
    return runs


def part_gpu(device: torch.device, smoke: bool) -> list[str]:
    """The gpu section: one row per shape and placement."""
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES
    samples, seq_len = (4, 64) if smoke else (128, 2048)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test, tiny shapes)"
    lines = [f"## GPU: {name}, {str(dtype).split('.')[-1]} random weights, {samples} x {seq_len} calibration "
             "tokens, 30% of MLP, SNP default", "",
             "Phases from the report (s). *Host reads per decide*: inside each site's decision, the synchronising "
             "calls `torch.cuda.set_sync_debug_mode` reports (CPU: the dispatch proxy, docs/design.md §3.10), "
             "least to most over the sites, against the units they removed.", "",
             "| model | parameters | placement | pruning s | statistics s | decide s | cut s | recompute s | "
             "host reads per decide | units removed per site | peak GPU memory GiB | model GiB |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, (family, shape) in shapes.items():
        model = _random_model(family, dtype, shape)
        ids = torch.randint(0, shape["vocab_size"], (samples, seq_len), generator=torch.Generator().manual_seed(1))
        size = model_bytes(model)
        with tempfile.TemporaryDirectory(prefix="hf_snp_gpu_") as path:
            model.save_pretrained(path)
            del model
            for placement, options in _runs(family, size, device, smoke):
                lines.append(_measured_row(label, path, ids, placement, options, device, size))
                print(lines[-1], flush=True)
    return lines + [""]


def _measured_row(label: str, path: str, ids: torch.Tensor, placement: str, options: dict, device: torch.device,
                  size: int) -> str:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with decide_reads(device) as records:
        result = hf_snp.prune(path, method="snp", sparsity=0.3, calibration=ids, batch_size=8, progress=False,
                              dtype="bfloat16" if device.type == "cuda" else "float32", **options)
    sync(device)
    seconds = time.perf_counter() - start
    timings = result.report["timings_s"]
    reads, removed = [r for r, _ in records], [u for _, u in records]
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"
    row = (f"| {label} | {result.report['params_before']:,} | {placement} | {seconds:.1f} | "
           + " | ".join(f"{timings.get(k, 0.0):.1f}" for k in ("statistics", "decide", "cut", "recompute"))
           + f" | {min(reads)} to {max(reads)} | {min(removed)} to {max(removed)} | {peak} | {size / 2**30:.2f} |")
    del result
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row
