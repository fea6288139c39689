"""Several processes on torch.distributed: overhead and identity on this CPU, GPU rows, and a cost model.

    python benchmarks/distributed.py --parts cpu          # SmolLM2: 1 process x 2 threads vs torchrun 2 x 1 thread
    python benchmarks/distributed.py --parts gpu          # with GPUs: OPT-1.3b / Llama-7B shapes on 1, 2 ... N GPUs
    python benchmarks/distributed.py --parts cost_model   # Llama-3-70B on 8 GPUs: what each phase costs

Parts:
  cpu         The packaged SmolLM2-135M, 30% of MLP neurons with the SNP default, calibration on packaged
              WikiText-2: ``hf-snp prune`` in one process with 2 threads against ``torchrun --nproc-per-node 2
              -m hf_snp prune`` with 1 thread each (gloo). Wall seconds, each phase's seconds per rank (from the
              report), and the largest difference between the two saved models' weights.
  gpu         For 1, 2, ... (all visible) GPUs: random bf16 models of the OPT-1.3b and Llama-7B shapes saved to
              disk, pruned by ``torchrun --nproc-per-node N -m hf_snp prune`` (NCCL): statistics and decide
              seconds per rank, wall seconds.
  cost_model  The arithmetic of an 8-GPU Llama-3-70B run (hidden 8192, MLP 28672, 64 query / 8 KV heads, 80
              blocks, 128 x 2048 calibration tokens, 30% of MLP and heads, held-out ridge with 2 folds): bytes
              each all-reduce and broadcast moves per block, and the seconds of each phase under the stated
              hardware assumptions (not measurements).

Each part writes benchmarks/results/distributed_PART.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results")
PHASES = ("capture", "statistics", "decide", "cut", "recompute", "move")


def prune_command(model: str, out: str, ranks: int, options: list[str]) -> list[str]:
    """``hf-snp prune`` in this interpreter, under torchrun when ``ranks`` > 1."""
    if ranks == 1:
        return [sys.executable, "-m", "hf_snp", "prune", model, "--out", out, *options]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
            "hf_snp", "prune", model, "--out", out, *options]


def timed_run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def weight_difference(first: str, second: str) -> tuple[float, bool]:
    """(largest max|a - b| / max|b| over the weight tensors, whether every tensor has the same shape)."""
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(first, "model.safetensors")), load_file(os.path.join(second, "model.safetensors"))
    same = sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
    if not same:
        return float("inf"), False
    worst = max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12))
                for k in a)
    return worst, True


def phase_seconds(out: str) -> dict:
    with open(os.path.join(out, "hf_snp_report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    return {"world_size": report.get("world_size", 1), "timings_s": report["timings_s"],
            "per_rank": report.get("timings_per_rank_s")}


def part_cpu(args) -> list[str]:
    options = ["--sparsity", "0.3", "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
               "--calibration", "wikitext2-local", "--quiet"]
    rows, folders = [], {}
    with tempfile.TemporaryDirectory() as work:
        for ranks, threads in ((1, 2), (2, 1)):
            out = folders[ranks] = os.path.join(work, f"ranks{ranks}")
            seconds = timed_run(prune_command("smollm2-demo", out, ranks, options), threads)
            rows.append((ranks, threads, seconds, phase_seconds(out)))
        difference, same_shapes = weight_difference(folders[2], folders[1])
    lines = [f"SmolLM2-135M-Instruct, 30% of MLP, SNP default, {args.num_samples} x {args.seq_len} calibration "
             "tokens of packaged WikiText-2, CPU (gloo), load at start: " + _load(), "",
             "| processes x threads | wall s | statistics s | decide s | recompute s | capture s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for ranks, threads, seconds, phases in rows:
        timing = phases["timings_s"]
        lines.append(f"| {ranks} x {threads} | {seconds:.1f} | " + " | ".join(
            f"{timing.get(name, 0.0):.1f}" for name in ("statistics", "decide", "recompute", "capture")) + " |")
    lines += ["", f"Same shapes: {same_shapes}; largest weight difference, relative to each tensor's largest entry: "
                  f"{difference:.2e}."]
    return lines


def part_gpu(args) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--parts gpu needs CUDA devices")
    sys.path.insert(0, os.path.dirname(__file__))
    from cost import GPU_SHAPES, random_model

    lines = ["| shape | GPUs | wall s | statistics s (rank 0) | decide s (rank 0) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, (family, shape) in GPU_SHAPES.items():
        work = tempfile.mkdtemp(prefix="hf_snp_dist_")
        try:
            source = os.path.join(work, "model")
            random_model(family, dtype=torch.bfloat16, **shape).save_pretrained(source)
            options = ["--sparsity", "0.3", "--targets", "mlp,heads", "--num-samples", "128", "--seq-len", "2048",
                       "--calibration", "wikitext2-local", "--dtype", "bfloat16", "--quiet"]
            for ranks in range(1, torch.cuda.device_count() + 1):
                out = os.path.join(work, f"out{ranks}")
                seconds = timed_run(prune_command(source, out, ranks, options), threads=4)
                timing = phase_seconds(out)["timings_s"]
                lines.append(f"| {name} | {ranks} | {seconds:.1f} | {timing.get('statistics', 0):.1f} | "
                             f"{timing.get('decide', 0):.1f} |")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return lines


# Assumptions of the cost model (an H100 SXM node; stated, not measured here)
BF16_FLOPS = 400e12  # achieved dense bf16 GEMM
FP32_FLOPS = 50e12  # fp32 (no TF32) GEMM, the statistics' accumulation
FP64_FLOPS = 50e12  # fp64 tensor-core GEMM / factorizations, the decisions
HBM_BYTES_S = 3.0e12
ALLREDUCE_BUS_BYTES_S = 350e9  # NCCL ring all-reduce bus bandwidth over NVLink 4, large messages


def cost_model(ranks: int = 8, tokens: int = 128 * 2048, hidden: int = 8192, mlp: int = 28672, heads: int = 64,
               kv_heads: int = 8, head_dim: int = 128, blocks: int = 80, folds: int = 2,
               sparsity: float = 0.3) -> list[tuple[str, str, float]]:
    """(phase, formula, seconds per block) of one Llama-3-70B-shaped block, and the bytes an all-reduce moves."""
    block_params = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * mlp
    forward = 2 * block_params * tokens / ranks / BF16_FLOPS
    gram_flops = 0.56 * 2 * (mlp ** 2 + (heads * head_dim) ** 2) * tokens / ranks  # upper block panels only
    statistics = forward + gram_flops / FP32_FLOPS
    gram_bytes = 8 * folds * (mlp ** 2 + (heads * head_dim) ** 2)  # float64, one Gram per fold and site
    allreduce = gram_bytes * 2 * (ranks - 1) / ranks / ALLREDUCE_BUS_BYTES_S
    # decide, per site (one rank each; a block has 2 sites, so at most 2 ranks work): factor and invert M, the
    # held-out ridge's eigendecompositions, and the OBS sweep reading W_eff [n, out] once per batch of removals
    removals = sparsity * mlp
    decide_mlp = (3 * mlp ** 3 / FP64_FLOPS) + (removals / 32) * 8 * mlp * hidden / HBM_BYTES_S
    decide_heads = 3 * (heads * head_dim) ** 3 / FP64_FLOPS
    decision_bytes = 4 * (1 - sparsity) * mlp * sparsity * mlp + 4 * (heads * head_dim) ** 2 * sparsity
    broadcast = decision_bytes / ALLREDUCE_BUS_BYTES_S
    recompute = forward
    return [
        ("statistics (forward + Grams, 1/N of the tokens each)", f"{forward:.3f} s forward + "
         f"{gram_flops / FP32_FLOPS:.3f} s Grams", statistics),
        ("all-reduce of the float64 Grams", f"{gram_bytes / 2 ** 30:.1f} GiB per block", allreduce),
        ("decide (MLP site; heads on another rank in parallel)", f"max({decide_mlp:.2f}, {decide_heads:.2f}) s",
         max(decide_mlp, decide_heads)),
        ("broadcast of the decisions", f"{decision_bytes / 2 ** 20:.0f} MiB", broadcast),
        ("recompute (cut block, 1/N of the tokens each)", "forward of the cut block", recompute),
    ]


def part_cost_model(args) -> list[str]:
    rows = cost_model()
    total = sum(seconds for _, _, seconds in rows)
    lines = ["Llama-3-70B shape on 8 GPUs (H100 SXM, NVLink): per block, with the assumptions below; x 80 blocks.", "",
             "| phase | size | seconds per block |", "| --- | --- | ---: |"]
    lines += [f"| {phase} | {size} | {seconds:.3f} |" for phase, size, seconds in rows]
    lines += [f"| total | | {total:.2f} (x 80 blocks: {80 * total / 60:.1f} min) |", "",
              f"Assumptions: bf16 GEMM {BF16_FLOPS / 1e12:.0f} TFLOP/s, fp32 {FP32_FLOPS / 1e12:.0f} TFLOP/s, fp64 "
              f"{FP64_FLOPS / 1e12:.0f} TFLOP/s, HBM {HBM_BYTES_S / 1e12:.1f} TB/s, NCCL all-reduce bus bandwidth "
              f"{ALLREDUCE_BUS_BYTES_S / 1e9:.0f} GB/s; the OBS sweep batches 32 removals per read of W_eff. "
              "These are stated numbers, not measurements: the gpu part measures the real ones.",
              "", "What limits the speed-up: the statistics and recompute passes divide by N; the all-reduce is a few "
              "percent of them; the decisions run one site per rank, and a dense block has two sites (MLP and "
              "heads), so beyond 2 ranks only mixtures of experts (one site per expert) decide faster."]
    return lines


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="cpu,cost_model")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    parts = {"cpu": part_cpu, "gpu": part_gpu, "cost_model": part_cost_model}
    for name in args.parts.split(","):
        lines = parts[name](args)
        command = f"python benchmarks/distributed.py --parts {name}"
        text = "\n".join([f"# distributed: {name}", "", f"Regenerate: `{command}`", "", *lines, ""])
        with open(os.path.join(RESULTS, f"distributed_{name}.md"), "w", encoding="utf-8") as handle:
            handle.write(text)
        print(text)


if __name__ == "__main__":
    main()
