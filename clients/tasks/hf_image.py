"""``hf_image_classification``: your own images on a local Hugging Face image-classification
checkpoint (its image processor beside it), one data set (single-task).

``model`` is a local folder that ``save_pretrained`` wrote for a model and its image processor
(AutoModelForImageClassification + AutoImageProcessor, ``local_files_only=True``; never
downloaded). The classifier is resized to the data's classes (``ignore_mismatched_sizes``) and
its fresh weights follow torch's global RNG like every task's model. ``files`` is one image
folder (``<class>/<image>``, optionally under ``train/`` and ``test/``) or one Parquet / Arrow /
saved data set with an image column (Hugging Face Image values or raw encoded bytes).

Stored rows are uint8 (H, W, C) pixels resized (PIL, bilinear) to the processor's output size;
``preprocess`` rescales and normalises them with the processor's factor, mean and std into
float (N, C, H, W). The model returns the logits (B, num_classes).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmerge.aggregators.params import hyperparameter
from fedmerge.clients.tasks.base import DataError
from fedmerge.clients.tasks.files import FileParams, LabeledSource, stamp
from fedmerge.clients.tasks.hf_text import CheckpointTask, pretrained_copy

__all__ = ["HFImageClassification", "HFImageClassifier", "HFImageParams", "ImageSettings"]


@dataclass(frozen=True)
class ImageSettings:
    """What the image processor does, as numbers: output size, channels, rescale, mean, std."""

    height: int
    width: int
    channels: int
    rescale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


@functools.lru_cache(maxsize=4)
def _settings(folder: str, _stamp: tuple) -> ImageSettings:
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    height, width = _get(size, "height"), _get(size, "width")
    if not (height and width):
        edge = _get(size, "shortest_edge") or _get(size, "longest_edge")
        if not edge:
            raise DataError(
                f"{folder}: cannot tell the image size from its image processor (size = "
                f"{size!r}); save a processor with size = {{'height': H, 'width': W}}"
            )
        height = width = int(edge)
    channels = int(getattr(config, "num_channels", 3) or 3)
    mean = processor.image_mean if processor.do_normalize else [0.0] * channels
    std = processor.image_std if processor.do_normalize else [1.0] * channels
    mean = [mean] * channels if isinstance(mean, (int, float)) else list(mean)
    std = [std] * channels if isinstance(std, (int, float)) else list(std)
    return ImageSettings(
        height=int(height),
        width=int(width),
        channels=channels,
        rescale=float(processor.rescale_factor) if processor.do_rescale else 1.0,
        mean=tuple(float(m) for m in mean[:channels]),
        std=tuple(float(s) for s in std[:channels]),
    )


class HFImageClassifier(nn.Module):
    """A transformers image-classification model whose forward returns its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


@dataclass(frozen=True)
class HFImageParams(FileParams):
    model: str = hyperparameter(
        "", "a local image-classification checkpoint folder (model + image processor)"
    )
    image_column: str = hyperparameter("image", "the column holding the images")


class HFImageClassification(CheckpointTask):
    """Image -> class on a local checkpoint; see the module docstring."""

    name = "hf_image_classification"
    Params: Any = HFImageParams
    multi_task_ok = False

    model_hint = (
        "a local image-classification checkpoint folder (save_pretrained of a model and its "
        "image processor)"
    )

    def columns(self) -> tuple[str, ...]:
        return (self.params.image_column,)

    def settings(self) -> ImageSettings:
        folder = self.model_dir()
        return _settings(str(folder), stamp(folder))

    def rows(self, source: LabeledSource, split: str) -> np.ndarray:
        from PIL import Image

        s = self.settings()
        mode = "RGB" if s.channels == 3 else "L" if s.channels == 1 else None
        if mode is None:
            raise DataError(f"{self.model_dir()}: {s.channels} image channels; 1 or 3 are read")
        name = self.params.image_column
        out = np.empty((len(source.labels(split)), s.height, s.width, s.channels), np.uint8)
        for i, value in enumerate(source.column(split, name).to_pylist()):
            try:
                if isinstance(value, dict):  # a Hugging Face Image value: bytes and/or a path
                    data = value.get("bytes")
                    image = Image.open(io.BytesIO(data) if data else value["path"])
                elif isinstance(value, bytes):
                    image = Image.open(io.BytesIO(value))
                else:
                    raise TypeError(f"{type(value).__name__} is not an image")
                image = image.convert(mode).resize((s.width, s.height), Image.BILINEAR)
            except Exception as exc:  # a corrupt or non-image value
                raise DataError(
                    f"{source.path}: image {i} of the {split} split in column {name!r} cannot be "
                    f"read ({type(exc).__name__}: {exc})"
                ) from exc
            out[i] = np.asarray(image, dtype=np.uint8).reshape(s.height, s.width, s.channels)
        return out

    def build_model(self) -> nn.Module:
        model = pretrained_copy("image", self.model_dir(), self.num_classes)
        for module_name in getattr(model, "fedmerge_fresh_modules", ()):
            module = model.get_submodule(module_name)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()  # the resized classifier: fresh from the global RNG
        return HFImageClassifier(model)

    def preprocess(self, x: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) -> float32 (N, C, H, W), rescaled then normalised."""
        s = self.settings()
        pixels = np.asarray(x, dtype=np.float32) * np.float32(s.rescale)
        pixels = (pixels - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
