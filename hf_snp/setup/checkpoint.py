"""Resumable runs: the state after each block, written atomically to ``checkpoint_dir``.

Stored per block: its pruned weights (safetensors) and the per-layer records; the hidden
states are not stored but recomputed on resume by replaying the restored blocks, which costs
at most one forward pass over the calibration tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..units.records import LayerRecord

STATE = "state.json"


def fingerprint(*parts) -> str:
    """A digest of everything that must match for a resume to finish like the original run."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(path)
    handle, staging = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    os.close(handle)
    try:
        write(staging)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


class Checkpoint:
    """The run's progress in ``directory``: blocks done, their records and pruned weights."""

    def __init__(self, directory: str, digest: str, completed: int = 0, records: list[LayerRecord] | None = None):
        self.directory, self.digest, self.completed, self.records = directory, digest, completed, records or []

    @classmethod
    def open(cls, directory: str, digest: str, resume: bool) -> "Checkpoint":
        """Start or continue a run; refuses to mix runs (checked before any long work)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, STATE)
        if not os.path.exists(path):
            return cls(directory, digest)
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        if not resume:
            raise FileExistsError(
                f"checkpoint_dir {directory!r} holds a run ({state['completed']} blocks done); "
                "pass resume=True (--resume) to finish it, or choose an empty directory"
            )
        if state["fingerprint"] != digest:
            raise ValueError(
                f"the checkpoint in {directory!r} was made with another model, calibration or settings; "
                "resume with the same arguments, or use a new checkpoint_dir"
            )
        return cls(directory, digest, state["completed"], [LayerRecord.from_dict(r) for r in state["records"]])

    def block_path(self, index: int) -> str:
        return os.path.join(self.directory, f"block_{index:05d}.safetensors")

    def save(self, index: int, block: nn.Module, records: list[LayerRecord]) -> None:
        """Persist block ``index`` (already pruned, still on the execution device) and the records so far."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        _atomic_write(self.block_path(index), lambda path: save_file(state, path))
        self.completed, self.records = index + 1, list(records)
        payload = {"fingerprint": self.digest, "completed": self.completed,
                   "records": [record.to_dict() for record in self.records]}
        _atomic_write(os.path.join(self.directory, STATE), lambda path: _dump(payload, path))

    def load_block(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(self.block_path(index))


def _dump(payload: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
