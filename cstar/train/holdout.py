"""The held-out split of the training set that picks the best robust epoch."""

from __future__ import annotations

import copy

import torch
from torch.utils.data import Dataset, Subset


def split_train_val(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Deterministic held-out split of the training set (for best-robust checkpoint selection).

    The held-out part reads an augmentation-free view of the data (ImageFolder: resize + center crop).
    """
    n = len(dataset)  # type: ignore[arg-type]
    n_val = int(round(n * fraction))
    if n_val == 0:
        return dataset, None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[n_val:]), Subset(_without_augmentation(dataset), order[:n_val])


def _without_augmentation(dataset: Dataset) -> Dataset:
    if not getattr(dataset, "augment", False):
        return dataset
    view = copy.copy(dataset)
    view.augment = False  # type: ignore[attr-defined]
    return view
