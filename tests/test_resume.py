"""Resume: a run killed after block k finishes, with resume=True, with bit-identical weights."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

import pytest
import torch
from conftest import TINY, calibration_ids
from safetensors.torch import load_file

import hf_snp
from hf_snp.setup.checkpoint import Checkpoint


def prune_killed_after_block(kill_after: int, model: str, **kwargs) -> int:
    """hf_snp.prune in a child forked from this process (torch and hf_snp already imported) that SIGKILLs itself
    once block ``kill_after``'s checkpoint is written: no cleanup, as in a crash or an OOM kill. Returns the
    child's wait status. Callers hold torch at one thread: an OpenMP thread pool does not survive a fork."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            original = Checkpoint.save

            def save_then_kill(self, index, block, records):
                original(self, index, block, records)
                if index == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)

            Checkpoint.save = save_then_kill
            hf_snp.prune(model, **kwargs)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(1)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked run neither died nor finished within 300 s")


@pytest.fixture
def one_torch_thread():
    """The forked child computes blocks 0..k, this process the rest and the uninterrupted run: all on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Per (family, options): the dense model's folder and the uninterrupted run's weights, shared by the kill
    points (the same deterministic run)."""
    made = {}

    def get(family, options, common):
        key = repr((family, options))
        if key not in made:
            folder = tmp_path_factory.mktemp("dense")
            TINY[family]().save_pretrained(folder / "dense")
            hf_snp.prune(str(folder / "dense"), output_dir=str(folder / "uninterrupted"), **common)
            made[key] = str(folder / "dense"), load_file(folder / "uninterrupted" / "model.safetensors")
        return made[key]

    return get


@pytest.mark.parametrize("family, options", [
    ("llama", dict(method="snp", sparsity=0.3, targets=["mlp", "heads"])),
    ("opt", dict(method="vbp", sparsity=0.3, targets=["mlp", "heads"], layer_sparsity={1: 0.999})),
    ("llama", dict(method="vbp", sparsity=0.25, targets=["mlp"], gqa_mode="kv_groups")),
])
@pytest.mark.parametrize("kill_after", [0, 2])
def test_killed_run_resumes_to_identical_weights(tmp_path, family, options, kill_after, uninterrupted,
                                                 one_torch_thread):
    common = dict(calibration=calibration_ids(), progress=False, device="cpu", batch_size=4, **options)
    dense, expected = uninterrupted(family, options, common)

    status = prune_killed_after_block(kill_after, dense, checkpoint_dir=str(tmp_path / "ckpt"), **common)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"wait status {status}: the child was not killed (its traceback is in the captured stderr)"
    assert sorted(f for f in os.listdir(tmp_path / "ckpt") if f.startswith("block")) \
        == [f"block_{i:05d}.safetensors" for i in range(kill_after + 1)]

    with pytest.raises(FileExistsError, match="pass resume=True"):
        hf_snp.prune(dense, checkpoint_dir=str(tmp_path / "ckpt"), **common)
    resumed = hf_snp.prune(dense, checkpoint_dir=str(tmp_path / "ckpt"), resume=True,
                           output_dir=str(tmp_path / "resumed"), **common)
    assert resumed.report["timings_s"]["resume"] > 0
    got = load_file(tmp_path / "resumed" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_resume_with_other_settings_is_refused(tmp_path):
    TINY["llama"]().save_pretrained(tmp_path / "dense")
    common = dict(calibration=calibration_ids(), progress=False, batch_size=4)
    hf_snp.prune(str(tmp_path / "dense"), sparsity=0.3, checkpoint_dir=str(tmp_path / "ckpt"), **common)
    with pytest.raises(ValueError, match="made with another model, calibration or settings"):
        hf_snp.prune(str(tmp_path / "dense"), sparsity=0.5, checkpoint_dir=str(tmp_path / "ckpt"), resume=True,
                     **common)
    with pytest.raises(ValueError, match="needs the checkpoint_dir"):
        hf_snp.prune(str(tmp_path / "dense"), resume=True, **common)
