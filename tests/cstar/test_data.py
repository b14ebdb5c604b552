"""Data registry: deterministic splits, specs, every supported on-disk format, clear errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cstar.data import DataBundle, dataset_names, load_dataset, stratified_indices, to_tensors
from cstar.errors import CstarError


def test_digits_default_is_16x16_stratified_and_deterministic(digits: DataBundle) -> None:
    assert digits.spec.input_shape == (1, 16, 16)
    assert digits.spec.default_eps == pytest.approx(0.2)
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    test_counts = np.bincount(digits.labels("test"), minlength=10)
    all_counts = test_counts + np.bincount(digits.labels("train"), minlength=10)
    assert np.abs(test_counts - 0.2 * all_counts).max() <= 1.0  # stratified: every class split 80/20
    again = load_dataset("digits")
    x1, y1 = to_tensors(digits.test)
    x2, y2 = to_tensors(again.test)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0


def test_digits_resize_option() -> None:
    bundle = load_dataset("digits", image_size=8)
    images, _ = to_tensors(bundle.test, limit=4)
    assert tuple(images.shape) == (4, 1, 8, 8)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(CstarError) as info:
        load_dataset("mnist-typo")
    for name in dataset_names():
        assert name in (info.value.hint or "")


@pytest.mark.parametrize("arg", ["cifar10:/nonexistent/cifar", "imagefolder:/nonexistent/tree",
                                 "fashion-mnist:/nonexistent/fm"])
def test_missing_path_names_path_and_layout(arg: str) -> None:
    with pytest.raises(CstarError) as info:
        load_dataset(arg)
    assert "/nonexistent" in str(info.value)


def test_path_dataset_without_path_is_an_error() -> None:
    with pytest.raises(CstarError, match="needs a path"):
        load_dataset("cifar10")


def test_stratified_indices_are_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(5), 40)
    a = stratified_indices(labels, 23, seed=3)
    assert np.array_equal(a, stratified_indices(labels, 23, seed=3))
    counts = np.bincount(labels[a], minlength=5)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 23


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    bundle = load_dataset(f"fashion-mnist:{tmp_path}")
    assert bundle.spec.input_shape == (1, 28, 28) and bundle.spec.default_eps == pytest.approx(0.1)
    assert (len(bundle.train), len(bundle.test)) == (20, 10)
    images, labels = to_tensors(bundle.test)
    assert labels.tolist() == [i % 10 for i in range(10)] and float(images.max()) <= 1.0


def test_cifar10_pickle_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        with open(tmp_path / name, "wb") as handle:
            pickle.dump(batch, handle)
    bundle = load_dataset(f"cifar10:{tmp_path}")
    assert bundle.spec.input_shape == (3, 32, 32) and bundle.spec.default_eps == pytest.approx(8 / 255)
    assert (len(bundle.train), len(bundle.test)) == (20, 4)


def test_cifar10_pickle_refuses_arbitrary_objects(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({b"data": Evil(), b"labels": [0]}, handle)
    with pytest.raises(CstarError):
        load_dataset(f"cifar10:{tmp_path}")


def test_imagefolder_tree(tmp_path: Path) -> None:
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    bundle = load_dataset(f"imagefolder:{tmp_path}", image_size=8)
    assert bundle.spec.classes == ("cat", "dog") and bundle.spec.input_shape == (3, 8, 8)
    images, labels = to_tensors(bundle.test)
    assert tuple(images.shape) == (4, 3, 8, 8) and sorted(labels.tolist()) == [0, 0, 1, 1]


def test_imagefolder_wrong_layout(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(CstarError) as info:
        load_dataset(f"imagefolder:{tmp_path}")
    assert "train" in str(info.value)


def _cifar_tree(root: Path, empty_class: str | None = None) -> Path:
    from PIL import Image

    classes = [f"c{i}" for i in range(10)]
    for split in ("train", "test"):
        for cls in classes:
            folder = root / "cifar-10-images" / split / cls
            folder.mkdir(parents=True)
            if cls != empty_class:
                Image.fromarray(np.full((32, 32, 3), 20, dtype=np.uint8)).save(folder / "0.jpg")
    return root


def test_cifar10_image_tree_and_its_bad_layouts(tmp_path: Path) -> None:
    """The JPEG copy's layout loads; a tree without train/test, a wrong class count or an empty class
    folder is one clear error naming what is wrong (before any training starts)."""
    bundle = load_dataset(f"cifar10:{_cifar_tree(tmp_path / 'ok')}")
    assert bundle.spec.input_shape == (3, 32, 32) and bundle.spec.options["format"] == "imagefolder"
    assert bundle.spec.default_eps == pytest.approx(8 / 255)
    with pytest.raises(CstarError, match="holds no images"):
        load_dataset(f"cifar10:{_cifar_tree(tmp_path / 'empty', empty_class='c3')}")
    (tmp_path / "flat" / "images").mkdir(parents=True)
    with pytest.raises(CstarError, match="neither CIFAR-10 python batches nor an image tree"):
        load_dataset(f"cifar10:{tmp_path / 'flat'}")
    nine = _cifar_tree(tmp_path / "nine")
    for split in ("train", "test"):
        (nine / "cifar-10-images" / split / "c9" / "0.jpg").unlink()
        (nine / "cifar-10-images" / split / "c9").rmdir()
    with pytest.raises(CstarError, match="10 class folders"):
        load_dataset(f"cifar10:{nine}")
