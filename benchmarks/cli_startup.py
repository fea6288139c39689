"""The first minutes of the command line: how long `hf-snp --help` and `hf-snp prune --help` take, how long a
re-run of `hf-snp demo` takes to be refused, and (``--demo``) how long the demo takes and what it writes.

Each command runs in a fresh process (median of ``--repeats``); the machine's load average is recorded before and
after, since other jobs on a small machine change every number here.

    python benchmarks/cli_startup.py            # writes results/cli_startup.md
    python benchmarks/cli_startup.py --demo     # also runs `hf-snp demo` once in a temp dir: results/demo_run.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from measure import code_commit

RESULTS = os.path.join(os.path.dirname(__file__), "results")
HF_SNP = shutil.which("hf-snp") or "hf-snp"


def wall(command: list[str], cwd: str | None = None, expect: int = 0) -> float:
    """Seconds one fresh process takes to run ``command`` (its exit status must be ``expect``)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != expect:
        raise RuntimeError(f"{command} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
            f"hf_snp at commit {code_commit()}")


def startup(repeats: int) -> str:
    """The table of help and refusal times, as markdown."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="hf_snp_startup_") as scratch:
        done = os.path.join(scratch, "smollm2-snp30")
        os.makedirs(done)
        open(os.path.join(done, "model.safetensors"), "w").close()  # a first run's output
        commands = {
            "`hf-snp --help`": ([HF_SNP, "--help"], 0),
            "`hf-snp prune --help`": ([HF_SNP, "prune", "--help"], 0),
            "`hf-snp demo --help`": ([HF_SNP, "demo", "--help"], 0),
            "`python -c 'import hf_snp'`": ([sys.executable, "-c", "import hf_snp"], 0),
            "`hf-snp demo` again (refused: smollm2-snp30 exists)": ([HF_SNP, "demo"], 2),
        }
        for name, (command, expect) in commands.items():
            times = [wall(command, cwd=scratch, expect=expect) for _ in range(repeats)]
            rows.append(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} |")
    return "\n".join(["| command | median s | min s | max s |", "| --- | ---: | ---: | ---: |", *rows])


def demo_run(workdir: str | None) -> tuple[float, int, list[str], dict]:
    """Run `hf-snp demo --quiet` once in ``workdir`` (kept) or a temp dir: seconds, bytes written, the files of the
    output folder and its report."""
    with tempfile.TemporaryDirectory(prefix="hf_snp_demo_") as scratch:
        where = workdir or scratch
        os.makedirs(where, exist_ok=True)
        seconds = wall([HF_SNP, "demo", "--quiet"], cwd=where)
        return folder_summary(os.path.join(where, "smollm2-snp30"), seconds)


def folder_summary(out: str, seconds: float) -> tuple[float, int, list[str], dict]:
    names = sorted(os.listdir(out))
    size = sum(os.path.getsize(os.path.join(out, name)) for name in names if os.path.isfile(os.path.join(out, name)))
    with open(os.path.join(out, "hf_snp_report.json"), encoding="utf-8") as handle:
        return seconds, size, names, json.load(handle)


def demo_text(seconds: float, size: int, names: list[str], report: dict, before: str, note: str) -> list[str]:
    """The demo's results file: the command, wall time, the pruning phases, perplexity and what it wrote."""
    timings = report.get("timings_s", {})
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k not in ("total", "cut_pass") and v >= 1)
    metrics = report.get("metrics", {})
    ppl = [metrics.get(key, float("nan")) for key in ("perplexity_before", "perplexity_after")]
    return ["## `hf-snp demo` (SmolLM2-135M-Instruct, 30% of MLP neurons, SNP; CPU)", "",
            f"({machine()}). Regenerate: `python benchmarks/cli_startup.py --demo`", "",
            "Command: `hf-snp demo --quiet` in an empty folder (the default output folder smollm2-snp30/).", "",
            f"- wall time: {seconds:.0f} s, of which pruning {timings.get('total', 0):.0f} s ({phases})",
            f"- calibration: {report.get('calibration')}; perplexity dense -> pruned {ppl[0]:.2f} -> {ppl[1]:.2f} "
            f"({metrics.get('perplexity_protocol', '')})",
            f"- generation and evaluation: the dense reference (perplexity, KL on text, greedy replies to the chat "
            f"prompts) {metrics.get('dense_reference_s', float('nan')):.0f} s; the calibration text the dense model "
            f"wrote {timings.get('calibration_generation', 0):.0f} s (in the pruning time); the pruned model's "
            f"evaluation {metrics.get('evaluation_s', float('nan')):.0f} s",
            f"- peak memory (the demo process's largest resident set): "
            f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB",
            f"- written: {size / 2**20:.0f} MiB in smollm2-snp30/ ({', '.join(names)})",
            f"- load average (1 / 5 / 15 min) before: {before}, after: {load()}." + (f" {note}" if note else ""), ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--demo", action="store_true", help="also run `hf-snp demo` once (minutes)")
    parser.add_argument("--workdir", default=None, help="--demo: run it there and keep smollm2-snp30/")
    parser.add_argument("--note", default="", help="a sentence on what else ran on the machine")
    args = parser.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    before = load()
    table = startup(args.repeats)
    text = ["## Command-line start-up (fresh processes)", "",
            f"({machine()}; median of {args.repeats}). Regenerate: `python benchmarks/cli_startup.py`", "",
            table, "", f"Load average (1 / 5 / 15 min) before: {before}, after: {load()}." +
            (f" {args.note}" if args.note else ""), ""]
    with open(os.path.join(RESULTS, "cli_startup.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(text))
    print("\n".join(text))
    if args.demo:
        before = load()
        text = demo_text(*demo_run(args.workdir), before, args.note)
        with open(os.path.join(RESULTS, "demo_run.md"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(text))
        print("\n".join(text))


if __name__ == "__main__":
    main()
