"""Resume: a run killed after block k finishes, with resume=True, with bit-identical weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY, calibration_ids
from safetensors.torch import load_file

import hf_snp

CHILD = """
import os, signal, torch, hf_snp
from hf_snp.checkpoint import Checkpoint
original = Checkpoint.save
def save_then_kill(self, index, block, records):
    original(self, index, block, records)
    if index == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as in a crash or an OOM kill
Checkpoint.save = save_then_kill
hf_snp.prune({model!r}, calibration=torch.load({ids!r}), progress=False, device="cpu", batch_size=4, checkpoint_dir={ckpt!r}, **{options!r})
"""


@pytest.mark.parametrize("family, options", [
    ("llama", dict(method="snp", sparsity=0.3, targets=["mlp", "heads"])),
    ("opt", dict(method="vbp", sparsity=0.3, targets=["mlp", "heads"], layer_sparsity={1: 0.999})),
    ("llama", dict(method="vbp", sparsity=0.25, targets=["mlp"], gqa_mode="kv_groups")),
])
@pytest.mark.parametrize("kill_after", [0, 2])
def test_killed_run_resumes_to_identical_weights(tmp_path, family, options, kill_after):
    TINY[family]().save_pretrained(tmp_path / "dense")
    ids = calibration_ids()
    torch.save(ids, tmp_path / "ids.pt")
    common = dict(calibration=ids, progress=False, device="cpu", batch_size=4, **options)

    hf_snp.prune(str(tmp_path / "dense"), output_dir=str(tmp_path / "uninterrupted"), **common)

    code = CHILD.format(kill_after=kill_after, model=str(tmp_path / "dense"), ids=str(tmp_path / "ids.pt"),
                        ckpt=str(tmp_path / "ckpt"), options=options)
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert sorted(f for f in os.listdir(tmp_path / "ckpt") if f.startswith("block")) == [f"block_{i:05d}.safetensors" for i in range(kill_after + 1)]

    with pytest.raises(FileExistsError, match="pass resume=True"):
        hf_snp.prune(str(tmp_path / "dense"), checkpoint_dir=str(tmp_path / "ckpt"), **common)
    resumed = hf_snp.prune(str(tmp_path / "dense"), checkpoint_dir=str(tmp_path / "ckpt"), resume=True,
                           output_dir=str(tmp_path / "resumed"), **common)
    assert resumed.report["timings_s"]["resume"] > 0
    expected, got = load_file(tmp_path / "uninterrupted" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_resume_with_other_settings_is_refused(tmp_path):
    TINY["llama"]().save_pretrained(tmp_path / "dense")
    common = dict(calibration=calibration_ids(), progress=False, batch_size=4)
    hf_snp.prune(str(tmp_path / "dense"), sparsity=0.3, checkpoint_dir=str(tmp_path / "ckpt"), **common)
    with pytest.raises(ValueError, match="made with another model, calibration or settings"):
        hf_snp.prune(str(tmp_path / "dense"), sparsity=0.5, checkpoint_dir=str(tmp_path / "ckpt"), resume=True, **common)
    with pytest.raises(ValueError, match="needs the checkpoint_dir"):
        hf_snp.prune(str(tmp_path / "dense"), resume=True, **common)
