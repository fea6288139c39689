"""``torchrun --nproc-per-node 2 -m hf_snp prune`` on CPU (gloo): the single-process weights, one writer, a failing
rank ending the run on every rank, and resume after a kill with another number of ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from safetensors.torch import load_file
from test_cli import tiny_dir  # noqa: F401  (the fixture: a tiny Llama with a tokenizer, and calibration text)

from hf_snp.cli import main

TIMEOUT = 300


def prune_flags(folder, out, *extra) -> list[str]:
    return [str(folder / "dense"), "--calibration", str(folder / "calib.txt"), "--num-samples", "8",
            "--seq-len", "32", "--batch-size", "2", "--out", str(out), "--quiet", *extra]


def torchrun(args: list[str], ranks: int = 2, script: str | None = None) -> subprocess.CompletedProcess:
    """``args`` after ``-m hf_snp prune`` (or a script's arguments) under torchrun on CPU, one thread per rank."""
    target = [script] if script else ["-m", "hf_snp", "prune"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_SNP_DIST_TIMEOUT": "120"}
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def assert_same_model(first, second):
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert float((a[name] - b[name]).abs().max()) <= 1e-4 * float(b[name].abs().max()), name


@pytest.mark.parametrize("extra", [("--targets", "mlp,heads"), ("--method", "vbp", "--targets", "mlp,heads",
                                                                  "--gqa-mode", "kv_groups")],
                         ids=["snp-default", "vbp-kv-groups"])
def test_two_ranks_save_the_single_process_model(tiny_dir, extra):  # noqa: F811
    assert main(["prune", *prune_flags(tiny_dir, tiny_dir / "one", "--sparsity", "0.4", *extra)]) == 0
    done = torchrun(prune_flags(tiny_dir, tiny_dir / "two", "--sparsity", "0.4", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"params_after"') == 1  # rank 0 alone prints the summary
    assert_same_model(tiny_dir / "two", tiny_dir / "one")
    report = json.load(open(tiny_dir / "two" / "hf_snp_report.json"))
    single = json.load(open(tiny_dir / "one" / "hf_snp_report.json"))
    assert report["world_size"] == 2 and len(report["timings_per_rank_s"]) == 2
    assert report["layers"] == single["layers"] and report["params_after"] == single["params_after"]
    assert sorted(os.listdir(tiny_dir / "two")) == sorted(os.listdir(tiny_dir / "one"))


FAILING_RANK = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    import hf_snp.units.stats as stats
    from hf_snp.cli import main

    original = stats.SiteStatistics.update

    def update(self, h):
        if dist.is_initialized() and dist.get_rank() == 1:
            raise ValueError("planted failure in the statistics")
        original(self, h)

    stats.SiteStatistics.update = update
    sys.exit(main(["prune", *sys.argv[1:]]))
""")


def test_a_failing_rank_ends_every_rank_with_its_message(tiny_dir, tmp_path):  # noqa: F811
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANK)
    start = time.monotonic()
    done = torchrun(prune_flags(tiny_dir, tiny_dir / "out"), script=str(script))
    assert done.returncode != 0
    assert time.monotonic() - start < TIMEOUT
    assert "hf-snp: error (rank 1 of 2): planted failure in the statistics" in done.stderr
    assert not (tiny_dir / "out").exists()  # nothing half-written


KILLED_AFTER_BLOCK_1 = textwrap.dedent("""
    import os
    import sys
    from hf_snp.setup.checkpoint import Checkpoint
    from hf_snp.cli import main

    original = Checkpoint.save

    def save_then_die(self, index, block, records):
        original(self, index, block, records)
        if index == 1:
            os._exit(9)  # a crash: no cleanup

    Checkpoint.save = save_then_die
    sys.exit(main(["prune", *sys.argv[1:]]))
""")


def test_a_killed_two_rank_run_resumes_in_one_process(tiny_dir, tmp_path):  # noqa: F811
    flags = ("--targets", "mlp,heads", "--sparsity", "0.4")
    assert main(["prune", *prune_flags(tiny_dir, tiny_dir / "whole", *flags)]) == 0
    script = tmp_path / "die.py"
    script.write_text(KILLED_AFTER_BLOCK_1)
    checkpoints = str(tmp_path / "checkpoints")
    done = torchrun(prune_flags(tiny_dir, tiny_dir / "resumed", *flags, "--checkpoint-dir", checkpoints),
                    script=str(script))
    assert done.returncode != 0 and not (tiny_dir / "resumed").exists()
    state = json.load(open(os.path.join(checkpoints, "state.json")))
    assert state["completed"] == 2
    assert main(["prune", *prune_flags(tiny_dir, tiny_dir / "resumed", *flags, "--checkpoint-dir", checkpoints,
                                       "--resume")]) == 0
    assert_same_model(tiny_dir / "resumed", tiny_dir / "whole")
