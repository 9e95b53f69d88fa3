"""Albumentations pipelines, split into a deterministic resize (cached once) and per-epoch augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_resize_side(image_size: int) -> int:
    """The paper resizes the shorter side to 256 before a 224 crop; keep that ratio at any size."""
    return round(image_size * 256 / 224)


def deterministic_resize(kind: str, image_size: int) -> A.BasicTransform:
    """The part of the pipeline that is the same every epoch, so its output can be cached."""
    if kind == "train":
        return A.SmallestMaxSize(max_size=train_resize_side(image_size))
    if kind == "eval":
        return A.Resize(image_size, image_size)
    raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")


def augmentation(
    kind: str,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Applied to the cached resized image: random crop and H/V flips for training, normalise only for eval."""
    normalize = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)
    if kind == "train":
        steps = [
            A.RandomCrop(image_size, image_size),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            normalize,
        ]
    elif kind == "eval":
        steps = [normalize]
    else:
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    return A.Compose(steps)


def to_chw_tensor_array(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
