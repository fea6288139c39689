"""Inference speed of pruned models against the dense one, loaded the way users load them.

Every variant is pruned, saved and reloaded with ``AutoModelForCausalLM.from_pretrained`` (stock class or the
hf_snp type), then measured with ``hf_snp.deliver.speed`` (prefill tokens/s at batch 1 and 8, time to first token,
decode tokens/s with the KV cache, KV-cache bytes per token), all variants interleaved, medians of the repeats.

    python benchmarks/inference.py --shapes smollm2 --dtypes float32,bfloat16 --repeats 3
    python benchmarks/inference.py --shapes opt-1.3b,llama-7b --layers 2 --device cuda --dtypes bfloat16

``smollm2`` is the real SmolLM2-135M (calibration: WikiText-2 validation); ``opt-1.3b`` and ``llama-7b`` are
those shapes with ``--layers`` decoder layers and random weights (calibration: random tokens). Writes
results/inference_<device>.md, .jsonl and a plot of speed-up against parameters removed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys

import torch
from measure import code_commit, first_windows, save_line_plot
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import hf_snp
from hf_snp.deliver.speed import SpeedProbe, compare_speed
from hf_snp.evaluation.perplexity import perplexity
from hf_snp.setup.calibration import packaged_text
from hf_snp.setup.loading import demo_model_source, load_model, load_tokenizer

RESULTS = os.path.join(os.path.dirname(__file__), "results")
CACHE = os.path.join(os.path.dirname(__file__), ".cache", "inference")

# name -> prune() options (None: the dense model); the round_to rows sweep the kept MLP width's multiple,
# the others use the defaults of the code being measured
VARIANTS = {
    "dense": None,
    "mlp 30%, round_to 1": dict(sparsity=0.3, round_to=1),
    "mlp 30%, round_to 8": dict(sparsity=0.3, round_to=8),
    "mlp 30%, round_to 16": dict(sparsity=0.3, round_to=16),
    "mlp 30%, round_to 32": dict(sparsity=0.3, round_to=32),
    "mlp 30%, round_to 64": dict(sparsity=0.3, round_to=64),
    "mlp 30%, round_to 128": dict(sparsity=0.3, round_to=128),
    "mlp 30%": dict(sparsity=0.3),
    "mlp+heads 30%": dict(sparsity=0.3, targets=("mlp", "heads")),
    "mlp+heads 30%, kv_groups": dict(sparsity=0.3, targets=("mlp", "heads"), gqa_mode="kv_groups"),
    "mlp 50%": dict(sparsity=0.5),
    "mlp 30%, per-layer widths": dict(sparsity=0.3, layer_sparsity={0: 0.2, 1: 0.4}),
}


def dense_model(shape: str, layers: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The dense model and its calibration ids."""
    if shape == "smollm2":
        source = demo_model_source()
        tokenizer = load_tokenizer(source)
        return load_model(source, dtype="float32"), first_windows(tokenizer, packaged_text("wikitext2-local"), 16, 256)
    torch.manual_seed(0)
    if shape == "opt-1.3b":
        config = OPTConfig(hidden_size=2048, ffn_dim=8192, num_hidden_layers=layers, num_attention_heads=32,
                           word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048)
        model = OPTForCausalLM(config)
    elif shape == "llama-7b":
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    ids = torch.randint(0, model.config.vocab_size, (16, 256), generator=torch.Generator().manual_seed(0))
    return model.eval(), ids


def saved_variants(shape: str, layers: int, names: list[str]) -> dict[str, str]:
    """Prune and save every variant once (cached in benchmarks/.cache); name -> directory."""
    folders, dense, ids = {}, None, None
    for name in names:
        folder = os.path.join(CACHE, f"{shape}-{layers}", name.replace(" ", "_").replace("%", "").replace(",", ""))
        folders[name] = folder
        if os.path.exists(os.path.join(folder, "config.json")):
            continue
        if dense is None:
            dense, ids = dense_model(shape, layers)
        options = VARIANTS[name]
        if options is None:
            dense.save_pretrained(folder)
            continue
        if "layer_sparsity" in options:
            options = {**options, "layer_sparsity": {i: options["layer_sparsity"][i % 2] for i in
                                                     range(len(hf_snp.get_adapter(dense.config).layers(dense)))}}
        hf_snp.prune(copy.deepcopy(dense), calibration=ids, batch_size=4, output_dir=folder, overwrite=True,
                     progress=False, **options)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the random-weight shapes")
    parser.add_argument("--variants", default=";".join(VARIANTS), help="variant names separated by ';'")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (GPU)")
    parser.add_argument("--ppl-windows", type=int, default=16,
                        help="SmolLM2: perplexity on this many 512-token WikiText-2 test windows (first dtype)")
    parser.add_argument("--name", default=None, help="results file stem (default inference_<device>)")
    args = parser.parse_args()

    wanted = [n.strip() for n in args.variants.split(";")]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {'; '.join(VARIANTS)}")
    names = [n for n in VARIANTS if n in wanted]
    probe = SpeedProbe((1, 8), args.prompt_len, args.new_tokens, args.repeats)
    stem = args.name or f"inference_{args.device.split(':')[0]}"
    rows = []
    for shape in args.shapes.split(","):
        folders = saved_variants(shape, args.layers, names)
        for dtype in args.dtypes.split(","):
            models = {name: AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                                 trust_remote_code=True).to(args.device).eval()
                      for name, folder in folders.items()}
            if args.compile:
                models = {name: torch.compile(model) for name, model in models.items()}
            measured = compare_speed(models, probe)
            ppl = {}
            if shape == "smollm2" and args.ppl_windows and dtype == args.dtypes.split(",")[0]:
                tokenizer = load_tokenizer(demo_model_source())
                ppl = {name: perplexity(model, tokenizer, "wikitext2-test-local", 512, args.ppl_windows, 4, False)
                       for name, model in models.items()}
            dense_params = sum(p.numel() for p in models[names[0]].parameters())
            for name, values in measured["models"].items():
                report = json.load(open(os.path.join(folders[name], "hf_snp_report.json"))) if name != "dense" else {}
                widths = sorted({layer.get("mlp_width") for layer in report.get("layers", []) if "mlp_width" in layer})
                params = sum(p.numel() for p in models[name].parameters())
                rows.append({"shape": shape if shape == "smollm2" else f"{shape} ({args.layers} layers)",
                             "dtype": dtype, "variant": name, "device": measured["device"], "params": params,
                             "removed": 1 - params / dense_params, "mlp_widths": widths,
                             "save_format": report.get("save_format", "stock"), "perplexity": ppl.get(name),
                             "commit": code_commit(), **values})
            del models
            gc.collect()
            print(f"{shape} {dtype}: done", file=sys.stderr)
    write(rows, stem, args)


def write(rows: list[dict], stem: str, args) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{stem}.jsonl"), "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=str) + "\n")
    lines = [f"# Inference speed ({rows[0]['device']})", "",
             f"`python benchmarks/inference.py {' '.join(sys.argv[1:])}` at commit {rows[0]['commit']}: each model "
             "saved and reloaded with `from_pretrained`, all variants measured interleaved, medians of "
             f"{args.repeats} repeats. Prefill: {args.prompt_len} tokens per sequence, no cache; decode: greedy "
             f"`generate` of {args.new_tokens} tokens at batch 1 after a {args.prompt_len}-token prompt, KV cache on. "
             "Speed-ups against the dense model in the same run. Perplexity (SmolLM2, first dtype): "
             f"{args.ppl_windows} windows of 512 tokens of the WikiText-2 test split.", ""]
    for (shape, dtype) in dict.fromkeys((row["shape"], row["dtype"]) for row in rows):
        lines += [f"## {shape}, {dtype}", "",
                  "| variant | parameters | removed | MLP width | saved as | prefill b1 tok/s | prefill b8 tok/s "
                  "| TTFT ms | decode tok/s | KV bytes/token | perplexity |",
                  "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in (r for r in rows if r["shape"] == shape and r["dtype"] == dtype):
            s = row["prefill_speedup"]
            lines.append(
                f"| {row['variant']} | {row['params']:,} | {row['removed']:.1%} | "
                f"{', '.join(map(str, row['mlp_widths'])) or '-'} | {row['save_format']} | "
                f"{row['prefill_b1_tokens_per_s']:.0f} ({s['b1']:.2f}x) | {row['prefill_b8_tokens_per_s']:.0f} "
                f"({s['b8']:.2f}x) | {1000 * row['ttft_s']:.0f} ({row['ttft_speedup']:.2f}x) | "
                f"{row['decode_tokens_per_s']:.1f} ({row['decode_speedup']:.2f}x) | "
                f"{row['kv_cache_bytes_per_token']:.0f} | "
                f"{'-' if row.get('perplexity') is None else format(row['perplexity'], '.2f')} |")
        lines.append("")
    with open(os.path.join(RESULTS, f"{stem}.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    series = {}
    for row in rows:
        if row["variant"] != "dense":
            series.setdefault(f"{row['shape']} {row['dtype']} prefill b8", []).append(
                (100 * row["removed"], row["prefill_speedup"]["b8"]))
            series.setdefault(f"{row['shape']} {row['dtype']} decode", []).append(
                (100 * row["removed"], row["decode_speedup"]))
    series = {label: sorted(points) for label, points in series.items()}
    save_line_plot(os.path.join(RESULTS, f"{stem}.png"), series, "parameters removed (%)", "speed-up over dense",
                   f"Inference speed-up ({rows[0]['device']})", reference=("dense", 1.0))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
