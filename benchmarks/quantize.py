"""Prune, then quantize, on CPU: dense, pruned, quantized, and pruned + quantized SmolLM2, each saved and reloaded
the way users load them, compared on size on disk, perplexity and speed.

    python benchmarks/quantize.py --schemes int8_weight_only,int8_dynamic --repeats 3

The pruned + quantized model is made by the one call a user makes: ``hf_snp.prune(..., quantize=scheme)``; the dense
model is quantized by ``from_pretrained(dense_dir, quantization_config=TorchAoConfig(...))``. Perplexity: WikiText-2
test, 512-token windows; speed: ``hf_snp.deliver.speed.compare_speed`` (all models interleaved, medians). Writes
results/quantize_cpu.md and .jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
from measure import code_commit, first_windows
from transformers import AutoModelForCausalLM, TorchAoConfig

import hf_snp
from hf_snp.deliver.quantize import torchao_config
from hf_snp.deliver.speed import SpeedProbe, compare_speed, weight_bytes
from hf_snp.evaluation.perplexity import perplexity
from hf_snp.setup.calibration import packaged_text
from hf_snp.setup.loading import demo_model_source, load_model, load_tokenizer

RESULTS = os.path.join(os.path.dirname(__file__), "results")
CACHE = os.path.join(os.path.dirname(__file__), ".cache", "quantize")


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
               if name.endswith(".safetensors"))


def saved_models(schemes: list[str], options: dict) -> dict[str, str]:
    """Prune / quantize / save each variant once (cached); name -> directory."""
    source = demo_model_source()
    tokenizer = load_tokenizer(source)
    ids = first_windows(tokenizer, packaged_text("wikitext2-local"), 16, 256)
    dense = None
    folders = {"dense": os.path.join(CACHE, "dense"), "pruned": os.path.join(CACHE, "pruned")}
    for scheme in schemes:
        folders[f"dense + {scheme}"] = os.path.join(CACHE, f"dense-{scheme}")
        folders[f"pruned + {scheme}"] = os.path.join(CACHE, f"pruned-{scheme}")
    for name, folder in folders.items():
        if os.path.exists(os.path.join(folder, "config.json")):
            continue
        dense = dense if dense is not None else load_model(source, dtype="float32")
        scheme = name.split(" + ")[1] if " + " in name else None
        if name == "dense":
            dense.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        elif name.startswith("dense + "):
            model = AutoModelForCausalLM.from_pretrained(folders["dense"], dtype=torch.float32,
                                                         quantization_config=TorchAoConfig(torchao_config(scheme)))
            model.save_pretrained(folder)
        else:
            hf_snp.prune(copy.deepcopy(dense), tokenizer, calibration=ids, batch_size=4, output_dir=folder,
                         overwrite=True, progress=False, quantize=scheme, **options)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default="int8_weight_only,int8_dynamic")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppl-windows", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    folders = saved_models(args.schemes.split(","), {"sparsity": args.sparsity})
    models = {name: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
              for name, folder in folders.items()}
    tokenizer = load_tokenizer(demo_model_source())
    measured = compare_speed(models, SpeedProbe((1, 8), 128, 32, args.repeats))
    rows = []
    for name, model in models.items():
        values = measured["models"][name]
        rows.append({"variant": name, "disk_bytes": folder_bytes(folders[name]), "weight_bytes": weight_bytes(model),
                     "perplexity": perplexity(model, tokenizer, "wikitext2-test-local", 512, args.ppl_windows, 4,
                                              False),
                     "device": measured["device"], "commit": code_commit(), **values})
        print(f"{name}: done", file=sys.stderr)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "quantize_cpu.jsonl"), "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=str) + "\n")
    dense = rows[0]
    lines = [f"# Prune, then quantize ({dense['device']})", "",
             f"`python benchmarks/quantize.py {' '.join(sys.argv[1:])}` at commit {dense['commit']}: SmolLM2-135M, "
             f"pruned = {args.sparsity:.0%} of MLP with the default settings; quantized with torchao through "
             "transformers; every model saved and reloaded with `from_pretrained`. Perplexity: "
             f"{args.ppl_windows} windows of 512 tokens of the WikiText-2 test split. Speed: medians of "
             f"{args.repeats} interleaved repeats (prefill 128 tokens; decode 32 tokens at batch 1), against dense.",
             "", "| model | safetensors on disk | perplexity | prefill b1 tok/s | prefill b8 tok/s | decode tok/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        s = row["prefill_speedup"]
        lines.append(f"| {row['variant']} | {row['disk_bytes'] / 2**20:,.1f} MiB "
                     f"({row['disk_bytes'] / dense['disk_bytes']:.0%}) | {row['perplexity']:.2f} | "
                     f"{row['prefill_b1_tokens_per_s']:.0f} ({s['b1']:.2f}x) | "
                     f"{row['prefill_b8_tokens_per_s']:.0f} ({s['b8']:.2f}x) | "
                     f"{row['decode_tokens_per_s']:.1f} ({row['decode_speedup']:.2f}x) |")
    with open(os.path.join(RESULTS, "quantize_cpu.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
