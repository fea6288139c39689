"""Images for vision models: calibration samples and labelled evaluation sets as ``pixel_values``.

Accepted sources: a ``datasets`` dataset with an image column, a folder of images (searched
recursively; ``imagefolder`` layout for labels), a list of PIL images, a ready ``pixel_values``
float tensor [N, C, H, W] (or a dict holding one), or a Hub dataset id (``"name"`` or
``"name:split"``, streamed). Images go through the model's own image processor.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .calibration import HUB_DATASETS, PACKAGED, SELF, CalibrationError
from .conversations import PACKAGED_CHAT
from .datasets import load_hub_dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "img", "pixel_values")


@dataclass
class ImageCalibrationData:
    """Calibration images as pixel values; every token of every image (CLS included) is a sample."""

    pixel_values: torch.Tensor
    source: str
    tokens_per_sample: int

    @property
    def num_samples(self) -> int:
        return self.pixel_values.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.num_samples * self.tokens_per_sample

    def model_batches(self, batch_size: int):
        """(forward kwargs, token mask) per batch: no image token is padding."""
        for start in range(0, self.num_samples, batch_size):
            yield {"pixel_values": self.pixel_values[start : start + batch_size]}, None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.pixel_values,)

    def select(self, indices: list[int]) -> "ImageCalibrationData":
        """These images only (a held-out split)."""
        return dataclasses.replace(self, pixel_values=self.pixel_values[indices])


def _is_pil(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with hf_snp
        return False
    return isinstance(item, Image.Image)


def image_column(data: Any) -> str | None:
    """The column of a ``datasets`` dataset that holds images (an Image feature, else a known name)."""
    import datasets

    features = getattr(data, "features", None) or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    columns = getattr(data, "column_names", None) or list(features)
    return next((name for name in IMAGE_COLUMNS if name in columns), None)


def folder_images(path: str) -> list[str]:
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(files)


def spec_modality(spec: Any) -> str | None:
    """"image", "text", or None (unknown: the loader of the model's modality reports it)."""
    if isinstance(spec, torch.Tensor):
        return "image" if spec.is_floating_point() and spec.dim() == 4 else "text"
    if isinstance(spec, dict):
        if "pixel_values" in spec or "input_ids" in spec:
            return "image" if "pixel_values" in spec else "text"
        kinds = {spec_modality(source) for source in spec}  # a mixture {source: share}
        return "text" if "text" in kinds else None
    if isinstance(spec, str):
        if os.path.isdir(spec):
            return "image" if folder_images(spec) else None
        if os.path.isfile(spec):
            return "image" if spec.lower().endswith(IMAGE_SUFFIXES) else "text"
        return "text" if spec.split(":")[0] in (*HUB_DATASETS, *PACKAGED, *PACKAGED_CHAT, SELF) else None
    if hasattr(spec, "column_names"):
        return "image" if image_column(spec) is not None else "text"
    if isinstance(spec, Sequence) and len(spec) > 0:
        if all(_is_pil(item) for item in spec):
            return "image"
        if all(isinstance(item, str) for item in spec):
            return "text"
    if type(spec).__name__ == "CalibrationData":
        return "text"
    return None


def check_modality(spec: Any, modality: str, family: str) -> None:
    """Fail at once when the data's kind does not match the model's (before any weights load)."""
    found = spec_modality(spec)
    if found is None or found == modality:
        return
    if modality == "image":
        raise CalibrationError(
            f"{family} is an image model, but calibration is text ({_describe(spec)}). Give images: a datasets.Dataset "
            "with an image column, a folder of images, a list of PIL images, or a pixel_values tensor [N, C, H, W]"
            + (" (the default calibration 'wikitext2' is text)" if spec == "wikitext2" else "")
        )
    raise CalibrationError(
        f"{family} is a text model, but calibration is images ({_describe(spec)}). Give text: a dataset name, a "
        ".txt/.jsonl path, a list of strings, a datasets.Dataset with a text column, or token ids [N, L]"
    )


def _describe(spec: Any) -> str:
    if isinstance(spec, torch.Tensor):
        return f"a {spec.dtype} tensor {tuple(spec.shape)}"
    if isinstance(spec, str) or (isinstance(spec, dict) and all(isinstance(key, str) for key in spec)):
        return repr(spec)
    return type(spec).__name__


def _hub_images(name: str, num_samples: int, seed: int) -> list:
    """``num_samples`` images streamed from a Hub dataset ``name[:split]``, shuffled with the seed."""
    path, _, split = name.partition(":")
    try:
        stream = load_hub_dataset(path, None, split or "train", streaming=True)
    except ConnectionError as error:
        raise CalibrationError(f"image dataset {path!r} needs the Hugging Face Hub, which is not reachable; "
                               "give a local folder of images, a list of PIL images "
                               "or a pixel_values tensor") from error
    rows = list(stream.shuffle(seed=seed, buffer_size=1000).take(num_samples))
    if not rows:
        raise CalibrationError(f"image dataset {name!r} gave no rows")
    column = next((c for c in IMAGE_COLUMNS if c in rows[0]), None)
    if column is None:
        raise CalibrationError(f"image dataset {name!r} has no image column (columns: {sorted(rows[0])})")
    return [row[column] for row in rows]


def resolve_images(spec: Any) -> tuple[list, str]:
    """The images of an image source (PIL images or file paths) and a short description."""
    if isinstance(spec, str) and os.path.isdir(spec):
        files = folder_images(spec)
        if not files:
            raise CalibrationError(f"folder {spec!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files, f"folder {os.path.basename(os.path.abspath(spec))}"
    if isinstance(spec, str) and os.path.isfile(spec):
        return [spec], os.path.basename(spec)
    if hasattr(spec, "column_names"):
        column = image_column(spec)
        if column is None:
            raise CalibrationError(f"the dataset has no image column (columns: {spec.column_names})")
        return spec, f"datasets.Dataset[{column}]"
    if isinstance(spec, Sequence) and spec and all(_is_pil(item) for item in spec):
        return list(spec), f"list of {len(spec)} images"
    raise CalibrationError(
        f"unsupported image calibration of type {type(spec).__name__}: give a datasets.Dataset with an image column, "
        "a folder of images, a list of PIL images, a pixel_values tensor [N, C, H, W], or a Hub dataset id"
    )


def _open(item: Any):
    from PIL import Image

    if isinstance(item, str):
        with Image.open(item) as image:
            return image.convert("RGB")
    return item.convert("RGB") if _is_pil(item) and item.mode not in ("RGB",) else item


def to_pixel_values(images: Sequence, image_processor: Any, batch_size: int = 64) -> torch.Tensor:
    """Preprocess images with the model's image processor; returns pixel values [N, C, H, W]."""
    if image_processor is None:
        raise CalibrationError("images need the model's image processor: pass image_processor=... "
                               "(AutoImageProcessor.from_pretrained(model_id)) or a ready pixel_values tensor")
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = [_open(item) for item in images[start : start + batch_size]]
        chunks.append(image_processor(images=batch, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


def _check_pixels(pixel_values: torch.Tensor) -> torch.Tensor:
    if not pixel_values.is_floating_point() or pixel_values.dim() != 4:
        raise CalibrationError(f"pixel_values must be a float tensor [N, C, H, W]; "
                               f"got {pixel_values.dtype} {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] == 0:
        raise CalibrationError("the pixel_values tensor is empty")
    return pixel_values


def load_image_calibration(spec: Any, image_processor: Any, num_samples: int, seed: int,
                           tokens_per_sample: int) -> ImageCalibrationData:
    """``num_samples`` calibration images (a seeded random subset when the source has more) as pixel values.

    A ``pixel_values`` tensor is used as given."""
    if isinstance(spec, ImageCalibrationData):
        return spec
    if isinstance(spec, dict) and "pixel_values" in spec:
        spec = torch.as_tensor(spec["pixel_values"])
    if isinstance(spec, torch.Tensor):
        pixels = _check_pixels(spec)
        return ImageCalibrationData(pixels, f"pixel_values {tuple(pixels.shape)}", tokens_per_sample)
    if isinstance(spec, str) and not os.path.exists(spec):
        images = _hub_images(spec, num_samples, seed)
        source = f"{spec}: {len(images)} images, seed {seed}"
    else:
        images, source = resolve_images(spec)
        if len(images) > num_samples:
            picks = torch.randperm(len(images),
                                   generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values
            images = ([images[i] for i in picks.tolist()] if not hasattr(images, "select")
                      else images.select(picks.tolist()))
        if hasattr(images, "column_names"):
            images = images[image_column(images)]
        source = f"{source}: {len(images)} images, seed {seed}"
    pixels = _check_pixels(to_pixel_values(list(images), image_processor))
    return ImageCalibrationData(pixels, source, tokens_per_sample)
