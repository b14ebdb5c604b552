"""The embedded default dataset: scikit-learn's bundled 8x8 digits (sklearn imported on load)."""

from __future__ import annotations

import numpy as np
import torch

from cstar.data.registry import register_dataset
from cstar.data.spec import DatasetSpec
from cstar.data.tensors import DataBundle, TensorImageDataset, _channel_stats, _resize
from cstar.errors import CstarError


@register_dataset("digits")
def _load_digits(path: str | None, image_size: int | None, augment: bool) -> DataBundle:
    """scikit-learn's bundled 8x8 digits; stratified 80/20 split, seed 0; default 16x16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if path:
        raise CstarError("dataset 'digits' is embedded and takes no path", "pass --data digits")
    size = 16 if image_size is None else image_size
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(labels.shape[0]), test_size=0.2, stratify=digits.target, random_state=0
    )
    images = _resize(images, size)
    mean, std = _channel_stats(images[train_idx])
    spec = DatasetSpec(
        name="digits",
        input_shape=(1, size, size),
        classes=tuple(str(i) for i in range(10)),
        mean=mean,
        std=std,
        default_eps=0.2,
        options={"image_size": size},
    )
    train = TensorImageDataset(images[train_idx], labels[train_idx], augment=False)
    test = TensorImageDataset(images[test_idx], labels[test_idx])
    return DataBundle(spec, train, test)
