"""What the setup phase settled for a run (``PruneRun``): everything the passes and delivery need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..adapters.base import ModelAdapter
from ..config import PruneConfig
from ..methods.base import PruningMethod
from ..units.allocation import WidthRules
from .calibration import CalibrationData
from .checkpoint import Checkpoint
from .images import ImageCalibrationData
from .loading import ModelSource, model_names


@dataclass
class PruneRun:
    """What the resolve phase settled: the run's inputs, ready for loading and the passes."""

    config: PruneConfig
    source: ModelSource | None  # None: the caller passed a loaded model
    model: PreTrainedModel | None
    model_config: PretrainedConfig
    adapter: ModelAdapter
    tokenizer: Any
    image_processor: Any
    method: PruningMethod
    calib: CalibrationData | ImageCalibrationData | None  # None until the model writes it (calibration="self")
    rules: WidthRules
    checkpoint: Checkpoint | None
    device: torch.device
    store: torch.device

    def model_names(self) -> tuple[str | None, str]:
        """(Hub id, display name) of the model: ``base_model`` when given, never a local path."""
        if self.config.base_model is not None:
            return self.config.base_model, self.config.base_model
        return model_names(self.source, self.model_config)
