"""Top-1 / top-5 accuracy of image classifiers (ViT, DeiT) on a labelled image set."""

from __future__ import annotations

import os
from typing import Any

import torch
from tqdm.auto import tqdm

from ..passes.placement import input_device
from ..setup.calibration import CalibrationError
from ..setup.datasets import load_hub_dataset
from ..setup.images import image_column, to_pixel_values

LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")


def load_image_dataset(spec: str):
    """A labelled image dataset: a folder in ``imagefolder`` layout (one sub-folder per class), or a
    Hub dataset id ``"name"`` / ``"name:split"`` (default split: validation)."""
    import datasets

    if os.path.isdir(spec):
        return datasets.load_dataset("imagefolder", data_dir=spec, split="train")
    path, _, split = spec.partition(":")
    return load_hub_dataset(path, None, split or "validation")


def _images_and_labels(dataset: Any, label_column: str | None) -> tuple[Any, torch.Tensor]:
    if isinstance(dataset, str):
        dataset = load_image_dataset(dataset)
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and not hasattr(dataset, "column_names"):
        images, labels = dataset
        return images, torch.as_tensor(labels).long()
    if hasattr(dataset, "column_names"):
        column = image_column(dataset)
        label = label_column or next((c for c in LABEL_COLUMNS if c in dataset.column_names), None)
        if column is None or label is None or label not in dataset.column_names:
            raise CalibrationError(f"the evaluation dataset needs an image column and a label column "
                                   f"(columns: {dataset.column_names}); name the label with label_column=")
        return dataset[column], torch.as_tensor(dataset[label]).long()
    raise CalibrationError(f"unsupported evaluation data {type(dataset).__name__}: give a datasets.Dataset with image "
                           "and label columns, an (images or pixel_values, labels) pair, an imagefolder path "
                           "or a Hub id")


@torch.no_grad()
def evaluate_accuracy(model, dataset: Any, image_processor: Any = None, batch_size: int = 32,
                      label_column: str | None = None, max_samples: int | None = None,
                      progress: bool = True) -> dict[str, float]:
    """Top-1 and top-5 accuracy of ``model`` on ``dataset`` ("top5" counts the min(5, classes) best).

    ``dataset``: a ``datasets.Dataset`` with image and label columns, a pair (images or a
    pixel_values tensor [N, C, H, W], labels), a folder in imagefolder layout, or a Hub id.
    Images go through ``image_processor`` (the model's own ``AutoImageProcessor``)."""
    images, labels = _images_and_labels(dataset, label_column)
    count = len(labels) if max_samples is None else min(max_samples, len(labels))
    if count == 0:
        raise CalibrationError("the evaluation dataset is empty")
    device = input_device(model)
    hits1 = hits5 = 0
    for start in tqdm(range(0, count, batch_size), desc="Accuracy", disable=not progress, leave=False):
        stop = min(start + batch_size, count)
        chunk = images[start:stop]
        pixels = chunk if isinstance(chunk, torch.Tensor) else to_pixel_values(list(chunk), image_processor, batch_size)
        logits = model(pixel_values=pixels.to(device)).logits.float().cpu()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        target = labels[start:stop].unsqueeze(1)
        hits1 += int((top[:, :1] == target).any(1).sum())
        hits5 += int((top == target).any(1).sum())
    return {"top1": hits1 / count, "top5": hits5 / count, "num_samples": count}
