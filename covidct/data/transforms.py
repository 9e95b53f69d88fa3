"""Albumentations pipelines, split into a deterministic resize (cached once) and per-epoch augmentation;
normalisation runs on the batch on the training device.

Loader workers hand over uint8 crops (a quarter of float32's bytes, and no float arithmetic on the CPU);
`normalize_images` then applies A.Normalize's formula to the whole batch on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch

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


def augmentation(kind: str, image_size: int) -> A.Compose:
    """Applied to the cached resized image: random crop and H/V flips for training, nothing for eval."""
    if kind == "train":
        steps = [A.RandomCrop(image_size, image_size), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    elif kind == "eval":
        steps = []
    else:
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    return A.Compose(steps)


def to_chw_uint8(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def normalize_images(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 NCHW (0..255) -> float32 (x / 255 - mean) / std per channel, on the images' device."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() - mean_t * 255.0) / (std_t * 255.0)
