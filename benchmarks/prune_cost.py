"""Cost of pruning SmolLM2-135M against one dense forward pass over the same calibration tokens.

    python benchmarks/prune_cost.py [--device cuda] [--num-samples 32] [--seq-len 512]

Prints a table, writes benchmarks/results/prune_cost[_DEVICE].md and a PNG of the phase times.
Peak memory is the process RSS (sampled every 5 ms) above the RSS with the model loaded, and
on a GPU the peak allocated device memory.
"""

from __future__ import annotations

import argparse
import copy
import os
import threading
import time

import torch

import hf_snp
from hf_snp.calibration import load_calibration
from hf_snp.loading import demo_model_source, load_model, load_tokenizer

RESULTS = os.path.join(os.path.dirname(__file__), "results")


class RssPeak:
    """Samples the resident set size in a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def dense_forward_seconds(model, ids: torch.Tensor, batch_size: int, device: torch.device) -> float:
    model(ids[:1, :32].to(device))  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        model(ids[i : i + batch_size].to(device), use_cache=False)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--method", default="snp")
    args = parser.parse_args()
    device = torch.device(args.device)

    source = demo_model_source()
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=torch.float32).to(device)
    calib = load_calibration("wikitext2-local", tokenizer, args.num_samples, args.seq_len, seed=0)
    tokens = calib.num_tokens

    dense = dense_forward_seconds(model, calib.input_ids, args.batch_size, device)
    baseline_rss = RssPeak.now()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline_gpu = torch.cuda.memory_allocated(device)
    with RssPeak() as rss:
        result = hf_snp.prune(copy.deepcopy(model) if device.type == "cuda" else model, tokenizer, method=args.method,
                              sparsity=args.sparsity, calibration=calib, batch_size=args.batch_size, device=device, progress=False)
    timings = result.report["timings_s"]
    prune_seconds = timings["total"]
    rows = [
        ("device", str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)),
        ("calibration tokens", f"{args.num_samples} x {args.seq_len} = {tokens}"),
        ("dense forward pass", f"{dense:.2f} s ({tokens / dense:.0f} tokens/s)"),
        (f"pruning ({args.method}, {args.sparsity:.0%} MLP)", f"{prune_seconds:.2f} s"),
        ("ratio pruning / dense forward", f"{prune_seconds / dense:.2f}x (target <= 2x)"),
        *[(f"  phase: {k}", f"{v:.2f} s") for k, v in timings.items() if k != "total"],
        ("peak RSS above the loaded model", f"{(rss.peak - baseline_rss) / 2**20:.0f} MiB (model {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.0f} MiB)"),
    ]
    if device.type == "cuda":
        rows.append(("peak GPU memory above the model", f"{(torch.cuda.max_memory_allocated(device) - baseline_gpu) / 2**20:.0f} MiB"))
    width = max(len(r[0]) for r in rows)
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))

    os.makedirs(RESULTS, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    command = f"python benchmarks/prune_cost.py --device {args.device} --num-samples {args.num_samples} --seq-len {args.seq_len}"
    with open(os.path.join(RESULTS, f"prune_cost{suffix}.md"), "w") as handle:
        handle.write(f"# Pruning cost: SmolLM2-135M\n\nRegenerate: `{command}`\n\n| what | value |\n| --- | --- |\n{table}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = {k: v for k, v in timings.items() if k != "total"}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    left = 0.0
    for name, seconds in phases.items():
        ax.barh("pruning", seconds, left=left, label=name)
        left += seconds
    ax.barh("dense forward", dense, color="grey")
    ax.set_xlabel("seconds")
    ax.set_title(f"SmolLM2-135M, {tokens} calibration tokens, {device.type}")
    ax.legend(ncol=6, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"prune_cost{suffix}.png"), dpi=120)


if __name__ == "__main__":
    main()
