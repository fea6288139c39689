"""Cost of pruning: against one dense forward pass, memory against depth, scaling in tokens and width.

    python benchmarks/cost.py [--parts ratio,depth,tokens,width] [--device cpu|cuda]
    python benchmarks/cost.py --parts gpu --device cuda          # OPT-1.3b / Llama-7B shapes, bf16
    python benchmarks/cost.py --parts gpu --smoke                # the same part on tiny shapes, on the CPU

Parts:
  ratio   SmolLM2-135M, 30% of MLP neurons with SNP, 32 x 512 calibration tokens: pruning seconds / one dense
          forward pass over the same tokens, for uniform, output_error and cumulative-variance ('global') allocation,
          and uniform with the per-site choice (ordering='heldout'), per phase; the load average is recorded, and a
          run on a busy machine says so.
  depth   Peak memory against depth: Llama-shaped models of random weights (hidden 1024, MLP 2816,
          16 heads / 4 KV heads) with 4, 8, 16, 32 blocks, each pruned in a fresh process, in memory
          and with every block offloaded to disk (accelerate ``offload_folder``).
  tokens  Seconds against calibration tokens (1k to 64k) on the 2-block model.
  width   Seconds and the decomposition's share against MLP width (1k to 8k) on a 2-block model.
  search_depth  The iterative search on random Llama models of 4, 8 and 16 blocks (hidden 512, MLP 1536, 8 x 128
          tokens), each in a fresh process: peak RSS and live heap above the built model, in blocks.
  search  Blocks with units on SmolLM2-135M (30% of decoder-layer parameters, mlp + heads + blocks, 16 x 256
          calibration tokens), each search in a fresh process: the iterative search (issue 18) against the
          three-candidate search, peak RSS and peak live heap above the loaded model (in model and block
          sizes), seconds, and the iterative search's seconds per round in dense forward passes.
  gpu     With a GPU (benchmarks/cost_gpu.py): OPT-1.3b- and Llama-7B-shaped models of random bf16 weights,
          128 x 2048 calibration tokens: statistics / decide / cut seconds, peak GPU memory and the host reads
          (synchronisations) of each site's decision; and the Llama-7B shape again with ``max_memory`` below its
          size, so accelerate offloads blocks to the CPU. ``--smoke``: tiny shapes on the CPU, printed only.

Each part writes benchmarks/results/cost_PART.md (and its plot); cost.md gathers the CPU parts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

import torch
from cost_gpu import part_gpu
from measure import RssPeak, code_commit, dense_forward_seconds, first_windows, model_bytes, save_line_plot

import hf_snp

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SHAPE = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
             max_position_embeddings=4096, tie_word_embeddings=False)


def random_model(family: str = "llama", dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    config = (LlamaConfig if family == "llama" else OPTConfig)(**{**(SHAPE if family == "llama" else {}), **overrides})
    torch.manual_seed(0)
    with torch.device("cpu"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def random_ids(vocab: int, samples: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, length), generator=torch.Generator().manual_seed(1))


FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: large buffers always mmapped, so returned when freed


def run_child(spec: dict, env: dict | None = None) -> dict:
    """One measurement in a fresh interpreter, so that its peak RSS is its own."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(spec: dict) -> None:
    if spec.get("search_depth"):
        return search_depth_child(spec)
    if spec.get("search"):
        return search_child(spec)
    _prune_child(spec)


SEARCH_DEPTH_SHAPE = dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                          num_key_value_heads=4, tie_word_embeddings=False)


def measured_prune(model, ids: torch.Tensor, tokenizer=None, **options) -> dict:
    """One dense forward pass, then SNP on ``ids`` (CPU, batches of 8): peak RSS and live heap above the process
    as it was before pruning, the model's and one block's bytes, seconds, and the block search's rounds."""
    dense = dense_forward_seconds(model, ids, 8, torch.device("cpu"))
    loaded, heap_loaded, weights = RssPeak.now(), RssPeak.heap_now(), model_bytes(model)
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    with RssPeak() as rss:
        result = hf_snp.prune(model, tokenizer, method="snp", calibration=ids, batch_size=8, device="cpu",
                              progress=False, **options)
    rounds = result.report.get("blocks", {}).get("rounds", [])
    return {"prune_peak": rss.peak - loaded, "heap_peak": rss.heap_peak - heap_loaded, "model_bytes": weights,
            "block_bytes": block, "seconds": result.report["timings_s"]["total"], "dense_forward": dense,
            "rounds": [r["seconds"] for r in rounds], "kept": [r["kept"] for r in rounds]}


def search_depth_child(spec: dict) -> None:
    """The iterative search (or units alone) on a random Llama of ``spec['search_depth']`` blocks."""
    model = random_model("llama", num_hidden_layers=spec["search_depth"], **SEARCH_DEPTH_SHAPE)
    ids = random_ids(SEARCH_DEPTH_SHAPE["vocab_size"], spec["samples"], spec["seq_len"])
    if spec.get("units_only"):
        got = measured_prune(model, ids, sparsity=spec["sparsity"], targets=("mlp", "heads"))
    else:
        got = measured_prune(model, ids, sparsity=spec["sparsity"], targets=("mlp", "heads", "blocks"),
                             block_search="iterative")
    print(json.dumps(got))


def search_child(spec: dict) -> None:
    """SmolLM2 pruned with blocks and units by ``spec['search']``: peaks above the loaded model, seconds."""
    from hf_snp.setup.calibration import packaged_text
    from hf_snp.setup.loading import demo_model_source, load_model, load_tokenizer

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    source = demo_model_source()
    tokenizer = load_tokenizer(source)
    ids = first_windows(tokenizer, packaged_text("wikitext2-local"), spec["samples"], spec["seq_len"])
    model = load_model(source, dtype=torch.float32)
    for param in model.parameters():  # weights mapped from the checkpoint become the process's own memory now
        param.data = param.data.clone()
    print(json.dumps(measured_prune(model, ids, tokenizer, sparsity=spec["sparsity"],
                                    targets=("mlp", "heads", "blocks"), block_search=spec["search"])))


def _prune_child(spec: dict) -> None:
    """Load the saved model ``spec['path']`` (optionally every block on disk), then prune it; print time and memory.

    Memory is the peak RSS while pruning above the RSS with the model loaded, and the RSS that
    the loaded model itself holds (its weights in memory; with disk offload, what stays resident)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(spec["path"])
    ids = random_ids(config.vocab_size, spec["samples"], spec["seq_len"])
    before_load = RssPeak.now()
    kwargs = {}
    if spec.get("offload"):
        layers = {f"model.layers.{i}": "disk" for i in range(config.num_hidden_layers)}
        kwargs = dict(device_map={"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                                  "lm_head": "cpu", **layers},
                      offload_folder=tempfile.mkdtemp(prefix="hf_snp_offload_"))
    model = AutoModelForCausalLM.from_pretrained(spec["path"], **kwargs).eval()
    if not spec.get("offload"):  # weights mapped from the checkpoint become the process's own memory now
        for param in model.parameters():
            param.data = param.data.clone()
    loaded, loaded_anon = RssPeak.now(), RssPeak.anon_now()
    with RssPeak() as rss:
        result = hf_snp.prune(model, method="snp", sparsity=0.3, calibration=ids, batch_size=8, device="cpu",
                              progress=False)
    print(json.dumps({"loaded_rss": loaded - before_load, "prune_peak": rss.peak - loaded,
                      "prune_anon_peak": rss.anon_peak - loaded_anon, "seconds": result.report["timings_s"]["total"]}))


def part_ratio(args, device) -> list[str]:
    from hf_snp.setup.calibration import load_calibration
    from hf_snp.setup.loading import demo_model_source, load_model, load_tokenizer

    source = demo_model_source()
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=torch.float32).to(device)
    calib = load_calibration("wikitext2-local", tokenizer, 32, 512, seed=0)
    load_before = os.getloadavg()[0]
    dense = dense_forward_seconds(model, calib.input_ids, 8, device)
    runs = []  # (label, seconds, target, phases); targets: issue 29
    specs = (("uniform", "uniform", {}, 1.5), ("output_error", "output_error", {}, 2.5), ("global", "global", {}, 2.5),
             ("uniform, ordering='heldout' (per-site choice)", "uniform", {"ordering": "heldout"}, 1.5))
    for label, allocation, options, target in specs:
        result = hf_snp.prune(copy.deepcopy(model), tokenizer, method="snp", sparsity=0.3, calibration=calib,
                              batch_size=8, device=device, allocation=allocation, progress=False, **options)
        timings = result.report["timings_s"]
        phases = ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if k not in ("total", "dense_pass", "cut_pass"))
        runs.append((label, timings["total"], target, phases))
        print(label, timings["total"], phases, flush=True)
    dense_after, load_after = dense_forward_seconds(model, calib.input_ids, 8, device), os.getloadavg()[0]
    reference = (dense + dense_after) / 2  # the dense passes before and after the runs: the machine's speed drifts
    rows = [f"| {label} | {seconds:.1f} | {seconds / reference:.2f}x | "
            f"{target}x {'met' if seconds / reference <= target else 'missed'} | {phases} |"
            for label, seconds, target, phases in runs]
    # another job's time is in ours when the load was up before we started (our own threads count after) or the
    # dense pass took longer or shorter by more than 15% at the end
    busy = device.type == "cpu" and (load_before > 1.0 or abs(dense_after - dense) > 0.15 * dense)
    warning = (f"**Taken on a busy machine (1-minute load average {load_before:.1f} before, {load_after:.1f} after, on "
               f"{os.cpu_count()} cores; dense pass {dense:.1f} s before, {dense_after:.1f} s after): not a result. "
               "Rerun on a quiet machine.**")
    return [f"## Pruning / one dense forward pass (SmolLM2-135M, 30% of MLP, SNP, {calib.num_tokens} tokens, "
            f"{device})", "", *([warning, ""] if busy else []),
            f"Dense forward pass: {dense:.2f} s ({calib.num_tokens / dense:.0f} tokens/s); after the runs: "
            f"{dense_after:.2f} s; the ratios are to their mean, {reference:.2f} s. Load average before / after: "
            f"{load_before:.2f} / {load_after:.2f}.", "",
            "| allocation | pruning s | ratio | target | phases (s) |", "| --- | ---: | ---: | ---: | --- |", *rows, ""]


def part_search(args) -> list[str]:
    """The iterative search against the three-candidate search: memory and seconds, each in a fresh process."""
    spec = {"samples": 16, "seq_len": 256, "sparsity": 0.3}
    lines = ["## Blocks with units: memory and cost of the search (SmolLM2-135M, 30% of decoder-layer parameters, "
             "mlp + heads + blocks, 16 x 256 tokens, CPU)", "",
             "Each search runs in a fresh process after a dense forward pass. *Peak RSS*: the highest resident set "
             "while pruning, above the RSS with the model loaded (prune works on that model in place). *Live heap*: "
             "the same for the bytes malloc has handed out and not had back (glibc's mallinfo2): what the search "
             "holds, without freed buffers the allocator keeps resident. The iterative search fixes glibc's mmap "
             "threshold itself (`placement.keep_freed_blocks_out_of_memory`).", "",
             "| search | peak RSS above the loaded model | in models | in blocks | live heap peak | in models | "
             "in blocks | seconds | dense forward s | rounds | seconds per round (in dense forwards) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for search in ("iterative", "candidates"):
        got = run_child({**spec, "search": search})
        per_round = [s / got["dense_forward"] for s in got["rounds"]]
        rounds = (f"{sum(per_round) / len(per_round):.1f} mean, {min(per_round):.1f} to {max(per_round):.1f} "
                  f"({''.join(k[0].upper() for k in got['kept'])})") if per_round else "-"
        lines.append(f"| {search} | {got['prune_peak'] / 2**20:.0f} MiB | {got['prune_peak'] / got['model_bytes']:.2f} "
                     f"| {got['prune_peak'] / got['block_bytes']:.1f} | {got['heap_peak'] / 2**20:.0f} MiB | "
                     f"{got['heap_peak'] / got['model_bytes']:.2f} | {got['heap_peak'] / got['block_bytes']:.1f} | "
                     f"{got['seconds']:.0f} | "
                     f"{got['dense_forward']:.1f} | {len(per_round) or '-'} | {rounds} |")
        print(lines[-1], flush=True)
    return lines + ["", f"Model weights: {got['model_bytes'] / 2**20:.0f} MiB; one block: "
                        f"{got['block_bytes'] / 2**20:.1f} MiB. Rounds: B a block kept, U units kept.", ""]


def part_search_depth(args) -> list[str]:
    """The iterative search's memory against depth: what it holds beyond the model should not grow with it."""
    spec = {"samples": 8, "seq_len": 128, "sparsity": 0.3}
    shape = SEARCH_DEPTH_SHAPE
    lines = [f"## Iterative block search: memory against depth (random-weight Llama, hidden {shape['hidden_size']}, "
             f"MLP {shape['intermediate_size']}, {shape['num_attention_heads']} heads / "
             f"{shape['num_key_value_heads']} KV heads, 30% of decoder-layer parameters, mlp + heads + blocks, "
             f"{spec['samples']} x {spec['seq_len']} tokens, CPU)", "",
             "Each run is a fresh process: it builds the model, runs one dense forward pass, then prunes with "
             "`block_search=\"iterative\"` (or, for comparison, the same budget of units alone with "
             "`targets=(\"mlp\", \"heads\")`: one streaming pass, no search). Peaks are above the process with "
             "the model built (RSS, and the live heap: malloc's bytes in use, glibc mallinfo2; plain unit pruning "
             "leaves glibc's mmap threshold as it is, so its RSS may hold freed buffers), also in blocks of this "
             "shape.", "",
             "| pruning | blocks | model MiB | block MiB | peak RSS above the model | in blocks | live heap peak | "
             "in blocks | seconds | rounds |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for units_only, depth in [(False, 4), (False, 8), (False, 16), (True, 4), (True, 16)]:
        got = run_child({**spec, "search_depth": depth, "units_only": units_only})
        lines.append(f"| {'units only' if units_only else 'iterative search'} | {depth} | "
                     f"{got['model_bytes'] / 2**20:.0f} | {got['block_bytes'] / 2**20:.1f} | "
                     f"{got['prune_peak'] / 2**20:.0f} MiB | {got['prune_peak'] / got['block_bytes']:.1f} | "
                     f"{got['heap_peak'] / 2**20:.0f} MiB | {got['heap_peak'] / got['block_bytes']:.1f} | "
                     f"{got['seconds']:.0f} | {''.join(k[0].upper() for k in got['kept']) or '-'} |")
        print(lines[-1], flush=True)
    return lines + ["", "Rounds: B a block kept, U units kept.", ""]


def part_depth(args) -> list[str]:
    runs = [(label, offload, env) for offload in (False, True)
            for label, env in (("", None), (", fixed mmap threshold", FIXED_MMAP))]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="hf_snp_depth_") as root:
        for depth in (4, 8, 16, 32):
            path = os.path.join(root, f"depth{depth}")
            model = random_model(num_hidden_layers=depth)
            size = model_bytes(model)
            model.save_pretrained(path)
            del model
            for label, offload, env in runs:
                got = run_child({"path": path, "samples": 8, "seq_len": 512, "offload": offload}, env)
                rows[depth, offload, label] = (size, got)
                print(f"depth {depth} offload {offload}{label}: loaded RSS {got['loaded_rss'] / 2**20:.0f} MiB, "
                      f"pruning peak above it {got['prune_peak'] / 2**20:.0f} MiB "
                      f"(anonymous {got['prune_anon_peak'] / 2**20:.0f} MiB), model "
                      f"{size / 2**20:.0f} MiB, {got['seconds']:.1f} s", flush=True)
    return depth_table(rows)


def depth_table(rows: dict) -> list[str]:
    """The depth section from {(depth, offload, label): (model bytes, child result)}; draws cost_depth.png."""
    mib = lambda value: f"{value / 2**20:.0f}"  # noqa: E731
    lines = ["## Peak memory against depth (random-weight Llama shape, hidden 1024, MLP 2816, fp32, "
             "8 x 512 tokens, CPU)", "",
             "Each run is a fresh process: it loads the model (in memory, or with every block offloaded to disk by "
             "accelerate), then prunes it. *Loaded*: the RSS the loaded model holds. *Peak*: the highest RSS while "
             "pruning, above that. *Anonymous*: the same without file pages mapped from the offload folder (the kernel "
             "drops and rereads those). *Fixed threshold*: run with `MALLOC_MMAP_THRESHOLD_=131072`, which keeps glibc "
             "from raising its mmap threshold after large frees and then keeping block-sized freed buffers in its "
             "heap; hf_snp sets the same itself when the model has offloaded weights, so both offload columns have "
             "it.", "",
             "| blocks | model MiB | in memory: loaded | peak | peak, fixed threshold | disk offload: loaded | peak "
             "| anonymous | anonymous, fixed threshold |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    depths = sorted({key[0] for key in rows})
    for depth in depths:
        size, mem = rows[depth, False, ""]
        mem_fixed = rows[depth, False, ", fixed mmap threshold"][1]
        off = rows[depth, True, ""][1]
        off_fixed = rows[depth, True, ", fixed mmap threshold"][1]
        lines.append(f"| {depth} | {mib(size)} | {mib(mem['loaded_rss'])} | {mib(mem['prune_peak'])} | "
                     f"{mib(mem_fixed['prune_peak'])} | "
                     f"{mib(off['loaded_rss'])} | {mib(off['prune_peak'])} | {mib(off['prune_anon_peak'])} | "
                     f"{mib(off_fixed['prune_anon_peak'])} |")
    series = {"model (fp32 weights)": [(d, rows[d, False, ""][0] / 2**20) for d in depths]}
    for offload, label, key in ((False, "", "prune_peak"), (False, ", fixed mmap threshold", "prune_peak"),
                                (True, "", "prune_anon_peak")):
        name = f"{'blocks on disk, anonymous' if offload else 'in memory'} peak above loaded{label}"
        series[name] = [(d, rows[d, offload, label][1][key] / 2**20) for d in depths]
    plot_lines("cost_depth.png", "blocks", "MiB", "Memory against depth", series)
    return lines + [""]


def timed_prune(model, ids, device, **options) -> tuple[float, dict]:
    result = hf_snp.prune(copy.deepcopy(model), method="snp", sparsity=0.3, calibration=ids, batch_size=8,
                          device=device, progress=False, **options)
    return result.report["timings_s"]["total"], result.report["timings_s"]


def part_tokens(args, device) -> list[str]:
    model = random_model(num_hidden_layers=2).to(device)
    lines = ["## Seconds against calibration tokens (2 blocks of the Llama shape, 512-token windows)", "",
             "| tokens | dense forward s | pruning s | ratio | pruning us/token |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    points = []
    for samples in (2, 4, 8, 16, 32, 64, 128):
        ids = random_ids(SHAPE["vocab_size"], samples, 512)
        dense = dense_forward_seconds(model, ids, 8, device)
        seconds, _ = timed_prune(model, ids, device)
        tokens = samples * 512
        points.append((tokens, seconds, dense))
        lines.append(f"| {tokens} | {dense:.2f} | {seconds:.2f} | {seconds / dense:.2f}x | "
                     f"{1e6 * seconds / tokens:.1f} |")
        print(lines[-1], flush=True)
    plot_lines("cost_tokens.png", "calibration tokens", "seconds", "Pruning time against calibration tokens",
               {"pruning": [(t, s) for t, s, _ in points], "dense forward": [(t, d) for t, _, d in points]}, log=True)
    return lines + [""]


def part_width(args, device) -> list[str]:
    lines = ["## Seconds against MLP width (2 blocks, hidden 1024, 32 x 512 tokens)", "",
             "| MLP width | pruning s | statistics s | decide s (decomposition) | cut s | recompute s | decide share |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    points = []
    ids = random_ids(SHAPE["vocab_size"], 32, 512)
    for width in (1024, 2048, 4096, 8192):
        model = random_model(num_hidden_layers=2, intermediate_size=width).to(device)
        seconds, timings = timed_prune(model, ids, device)
        share = timings.get("decide", 0.0) / seconds
        points.append((width, share))
        lines.append(f"| {width} | {seconds:.2f} | {timings.get('statistics', 0):.2f} | "
                     f"{timings.get('decide', 0):.2f} | {timings.get('cut', 0):.2f} | "
                     f"{timings.get('recompute', 0):.2f} | {share:.0%} |")
        print(lines[-1], flush=True)
    plot_lines("cost_width.png", "MLP width", "share of pruning time", "The decomposition's share against width",
               {"decide (greedy elimination + least squares)": points})
    return lines + [""]


def plot_lines(name: str, xlabel: str, ylabel: str, title: str, series: dict, log: bool = False) -> None:
    save_line_plot(os.path.join(RESULTS, name), series, xlabel, ylabel, title, logx=log, logy=log, size=(6, 3.8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="ratio,depth,tokens,width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="gpu part: tiny shapes on the CPU, nothing written")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    device = torch.device("cpu" if args.smoke else args.device)
    os.makedirs(RESULTS, exist_ok=True)
    parts = args.parts.split(",")
    header = f"({device.type}, {os.cpu_count()} CPU cores, torch {torch.__version__}, hf_snp at commit {code_commit()})"
    for part in parts:
        runner = {"ratio": lambda: part_ratio(args, device), "depth": lambda: part_depth(args),
                  "tokens": lambda: part_tokens(args, device), "width": lambda: part_width(args, device),
                  "search": lambda: part_search(args), "search_depth": lambda: part_search_depth(args),
                  "gpu": lambda: part_gpu(device, args.smoke)}.get(part)
        if runner is None:
            raise SystemExit(f"unknown part {part!r}")
        if part == "gpu" and device.type != "cuda" and not args.smoke:
            raise SystemExit("--parts gpu needs --device cuda (or --smoke: tiny shapes on the CPU)")
        lines = runner()
        if not args.smoke:
            write_part(part, lines, header, args.device)
    if not args.smoke:
        assemble()


def write_part(part: str, lines: list[str], header: str, device: str) -> None:
    command = f"python benchmarks/cost.py --parts {part} --device {device}"
    with open(os.path.join(RESULTS, f"cost_{part}.md"), "w") as handle:
        handle.write("\n".join([*lines[:1], "", f"{header}. Regenerate: `{command}`", *lines[1:]]))


def assemble() -> None:
    """results/cost.md: the CPU parts' sections, each as its latest run wrote it."""
    sections = []
    for part in ("ratio", "depth", "tokens", "width", "search", "search_depth"):
        path = os.path.join(RESULTS, f"cost_{part}.md")
        if os.path.exists(path):
            with open(path) as handle:
                sections.append(handle.read().strip())
    with open(os.path.join(RESULTS, "cost.md"), "w") as handle:
        handle.write("# Pruning cost\n\n"
                     "Each section comes from `benchmarks/cost.py --parts PART` (command in the section).\n\n"
                     + "\n\n".join(sections) + "\n")
    print(f"wrote {os.path.join(RESULTS, 'cost.md')}")

if __name__ == "__main__":
    main()
