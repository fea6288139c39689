"""The calibration windows every text source becomes: token ids [N, L] with their attention mask."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


class CalibrationError(ValueError):
    """The calibration data cannot give the requested samples."""


@dataclass
class CalibrationData:
    """Token windows for calibration; ``attention_mask`` marks real (non-padding) tokens;
    ``generation_seconds``: the time the model spent writing them (``calibration="self"``), else 0."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str
    generation_seconds: float = 0.0

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def model_batches(self, batch_size: int):
        """(forward kwargs, token mask) per batch; the mask is None when no token is padding."""
        for start in range(0, self.num_samples, batch_size):
            ids, mask = self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size]
            yield ({"input_ids": ids, "attention_mask": mask, "use_cache": False},
                   None if bool(mask.all()) else mask.bool().flatten())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask

    def select(self, indices: list[int]) -> "CalibrationData":
        """These windows only (a held-out split)."""
        return dataclasses.replace(self, input_ids=self.input_ids[indices], attention_mask=self.attention_mask[indices])


def concatenate(parts: list[CalibrationData], source: str, seed: int) -> CalibrationData:
    """The windows of ``parts`` (same length) in one seeded random order, so that every batch and every held-out
    fold mixes the sources."""
    ids = torch.cat([part.input_ids for part in parts])
    mask = torch.cat([part.attention_mask for part in parts])
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return CalibrationData(ids[order], mask[order], source, sum(part.generation_seconds for part in parts))
