"""Dataset registry: digits (embedded default), Fashion-MNIST, CIFAR-10, any ImageFolder tree.

Every dataset yields float32 CHW images in [0, 1] and int64 labels; normalization lives in the
model. Each carries a `DatasetSpec` (input shape, classes, mean/std, default eps) that manifests
record so later stages can rebuild the same view of the data.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cstar.errors import CstarError
from cstar.validate import classes as check_classes
from cstar.validate import open_image

FASHION_MNIST_DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and every later stage need to know about a dataset."""

    name: str
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_eps: float
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def data_arg(self) -> str:
        """The `--data` string that reloads this dataset."""
        return self.name if self.path is None else f"{self.name}:{self.path}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DatasetSpec:
        return cls(
            name=values["name"],
            input_shape=tuple(values["input_shape"]),
            classes=tuple(values["classes"]),
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
            default_eps=float(values["default_eps"]),
            path=values.get("path"),
            options=dict(values.get("options", {})),
        )


class TensorImageDataset(Dataset):
    """In-memory images (uint8 NCHW or float NCHW in [0,1]) with optional light augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False, crop_pad: int = 0) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be NCHW, got shape {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()
        self.augment = augment
        self.crop_pad = crop_pad

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if self.augment:
            image = _random_crop_flip(image, self.crop_pad)
        return image, self.labels[index]


def _random_crop_flip(image: torch.Tensor, pad: int) -> torch.Tensor:
    if pad > 0:
        _, height, width = image.shape
        padded = F.pad(image, (pad, pad, pad, pad))
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        image = padded[:, top : top + height, left : left + width]
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image


@dataclass
class DataBundle:
    """A loaded dataset: its spec and the train/test splits."""

    spec: DatasetSpec
    train: Dataset
    test: Dataset

    def labels(self, split: str) -> np.ndarray:
        """Labels of a split as a numpy array (cheap for in-memory datasets)."""
        dataset = self.train if split == "train" else self.test
        if isinstance(dataset, TensorImageDataset):
            return dataset.labels.numpy()
        targets = getattr(dataset, "targets", None)
        if targets is not None:
            return np.asarray(targets)
        return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- registry

Loader = Callable[[str | None, int | None, bool], DataBundle]
_REGISTRY: dict[str, Loader] = {}
_NEEDS_PATH: set[str] = set()


def register_dataset(name: str, needs_path: bool = False) -> Callable[[Loader], Loader]:
    """Decorator adding a loader `(path, image_size, augment) -> DataBundle` to the registry."""

    def wrap(loader: Loader) -> Loader:
        _REGISTRY[name] = loader
        if needs_path:
            _NEEDS_PATH.add(name)
        return loader

    return wrap


def dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def parse_dataset_arg(arg: str) -> tuple[str, str | None]:
    """'fashion-mnist:/data/fm' -> ('fashion-mnist', '/data/fm'); 'digits' -> ('digits', None)."""
    name, _, path = arg.partition(":")
    name = name.strip().lower()
    if name not in _REGISTRY:
        raise CstarError(
            f"unknown dataset '{name}'",
            f"valid datasets: {', '.join(dataset_names())} (path-based ones take NAME:PATH)",
        )
    if name in _NEEDS_PATH and not path:
        raise CstarError(f"dataset '{name}' needs a path", f"pass --data {name}:/path/to/data")
    return name, (path or None)


def load_dataset(arg: str, image_size: int | None = None, augment: bool = False) -> DataBundle:
    """Load a dataset by registry string (`name` or `name:path`)."""
    name, path = parse_dataset_arg(arg)
    if image_size is not None and image_size < 4:
        raise CstarError(f"image size {image_size} is too small", "use an image size of at least 4 pixels")
    bundle = _REGISTRY[name](path, image_size, augment)
    check_classes(bundle.spec.classes, f"dataset {arg}")
    return bundle


def load_dataset_from_spec(spec: DatasetSpec | dict[str, Any], augment: bool = False) -> DataBundle:
    """Reload the dataset a manifest recorded (same name, path and image size)."""
    spec = spec if isinstance(spec, DatasetSpec) else DatasetSpec.from_dict(spec)
    return load_dataset(spec.data_arg, image_size=spec.input_shape[-1], augment=augment)


def to_tensors(
    dataset: Dataset, indices: Sequence[int] | np.ndarray | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (a subset of) a dataset into float32 images and int64 labels."""
    if isinstance(dataset, TensorImageDataset) and not dataset.augment:
        chosen = torch.arange(len(dataset)) if indices is None else torch.as_tensor(np.asarray(indices))
        if limit is not None:
            chosen = chosen[:limit]
        images = dataset.images[chosen]
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return images.contiguous(), dataset.labels[chosen].clone()
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]  # type: ignore[arg-type]
    if limit is not None:
        order = order[:limit]
    pairs = [dataset[i] for i in order]
    return torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs], dtype=torch.long)


def stratified_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Deterministic class-stratified sample of `n` indices (as equal per class as possible)."""
    labels = np.asarray(labels)
    if n <= 0:
        raise CstarError(f"sample count must be positive, got {n}", "pass a positive number of samples")
    n = min(n, labels.shape[0])
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    chosen: list[int] = []
    round_index = 0
    while len(chosen) < n:
        for c in classes:
            pool = per_class[int(c)]
            if round_index < pool.shape[0] and len(chosen) < n:
                chosen.append(int(pool[round_index]))
        round_index += 1
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize float NCHW images to size x size (bilinear, antialiased when shrinking)."""
    if size is None or images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrinking = size < images.shape[-1]
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
    return resized.clamp(0.0, 1.0)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    flat = images.float().transpose(0, 1).reshape(images.shape[1], -1)
    if images.dtype == torch.uint8:
        flat = flat / 255.0
    mean = tuple(round(float(v), 4) for v in flat.mean(dim=1))
    std = tuple(round(max(float(v), 1e-3), 4) for v in flat.std(dim=1))
    return mean, std


# ------------------------------------------------------------------------------------------- digits


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


# ------------------------------------------------------------------------------------ fashion-mnist


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CstarError(f"{path} is not an unsigned-byte IDX file", "use the original Fashion-MNIST IDX files")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise CstarError(f"{path} is truncated ({body.size} bytes for shape {dims})", "re-download the file")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise CstarError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}",
        "expected train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz (apt-get install dataset-fashion-mnist puts them in "
        f"{FASHION_MNIST_DEFAULT_PATH})",
    )


@register_dataset("fashion-mnist")
def _load_fashion_mnist(path: str | None, image_size: int | None, augment: bool) -> DataBundle:
    root = Path(path or FASHION_MNIST_DEFAULT_PATH)
    if not root.is_dir():
        raise CstarError(
            f"Fashion-MNIST directory {root} does not exist",
            "apt-get install dataset-fashion-mnist, or pass --data fashion-mnist:/dir/with/idx/files",
        )
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        if images.shape[0] != labels.shape[0]:
            raise CstarError(f"{root}: {split} images and labels differ in count", "re-download the files")
        tensor = torch.from_numpy(images.copy()).unsqueeze(1)
        if image_size is not None and image_size != 28:
            tensor = (_resize(tensor.float() / 255.0, image_size) * 255.0).round().to(torch.uint8)
        splits[split] = (tensor, torch.from_numpy(labels.astype(np.int64)))
    size = int(splits["train"][0].shape[-1])
    spec = DatasetSpec(
        name="fashion-mnist",
        input_shape=(1, size, size),
        classes=FASHION_CLASSES,
        mean=(0.2860,),
        std=(0.3530,),
        default_eps=0.1,
        path=str(root) if path else None,
        options={"image_size": size},
    )
    train = TensorImageDataset(*splits["train"], augment=augment, crop_pad=2 if augment else 0)
    return DataBundle(spec, train, TensorImageDataset(*splits["test"]))


# ------------------------------------------------------------------------------------------ cifar10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 batches that refuses every global but numpy's array reconstruction."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as exc:
        raise CstarError(f"{path} is not a valid CIFAR-10 python batch ({exc})", "re-download CIFAR-10") from exc
    return data, labels


def _find_split_root(root: Path, markers: Sequence[str]) -> Path | None:
    """`root` or its single subdirectory that holds all `markers`."""
    for candidate in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if all((candidate / marker).exists() for marker in markers):
            return candidate
    return None


def _load_image_tree(split_dir: Path, classes: Sequence[str], size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of `split_dir/<class>/*` into one uint8 NCHW tensor (RGB).

    Cached per (folder, its modification time, classes, size) for this process: a benchmark that
    loads the same tree for training, compression and every evaluation decodes it once. Callers
    never modify the returned tensors.
    """
    return _load_image_tree_cached(str(split_dir.resolve()), split_dir.stat().st_mtime_ns, tuple(classes), size)


@functools.lru_cache(maxsize=4)
def _load_image_tree_cached(split_dir_name: str, _mtime_ns: int, classes: tuple[str, ...],
                            size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    split_dir = Path(split_dir_name)
    from PIL import Image
    from tqdm import tqdm

    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((split_dir / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise CstarError(f"no images found under {split_dir}", f"expected {split_dir}/<class>/<image>.png|jpg")
    found = {label for _, label in files}
    empty = [name for label, name in enumerate(classes) if label not in found]
    if empty:
        raise CstarError(f"class folder {split_dir / empty[0]} holds no images"
                         + (f" (nor do {len(empty) - 1} more)" if len(empty) > 1 else ""),
                         f"put that class's .png/.jpg files into {split_dir / empty[0]}, or remove the folder "
                         "from every split")
    arrays = []
    bars = len(files) >= 2000 and sys.stderr.isatty()  # a terminal only: no carriage-return frames in logs
    for path, _ in tqdm(files, desc=f"decoding {split_dir.name}", unit="img", leave=False, disable=not bars):
        with open_image(path) as image:
            rgb = image.convert("RGB")
            if size is not None and rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(rgb, dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise CstarError(f"images under {split_dir} have different sizes {sorted(shapes)[:3]}", "pass an image size")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([label for _, label in files], dtype=torch.long)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


@register_dataset("cifar10", needs_path=True)
def _load_cifar10(path: str | None, image_size: int | None, augment: bool) -> DataBundle:
    """CIFAR-10 from the python pickle batches or from an ImageFolder tree (train/, test/)."""
    assert path is not None
    root = Path(path)
    layout = "data_batch_1..5 + test_batch (python version), or train/<class>/*.png|jpg + test/<class>/..."
    if not root.is_dir():
        raise CstarError(f"CIFAR-10 directory {root} does not exist", f"expected layout: {layout}")
    pickle_root = _find_split_root(root, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    if pickle_root is not None:
        parts = [_read_cifar_batch(pickle_root / f"data_batch_{i}") for i in range(1, 6)]
        train_x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        test_np = _read_cifar_batch(pickle_root / "test_batch")
        test_x, test_y = torch.from_numpy(test_np[0]), torch.from_numpy(test_np[1])
        if image_size is not None and image_size != 32:
            train_x = (_resize(train_x.float() / 255, image_size) * 255).round().to(torch.uint8)
            test_x = (_resize(test_x.float() / 255, image_size) * 255).round().to(torch.uint8)
        classes: Sequence[str] = CIFAR10_CLASSES
    else:
        folder_root = _find_split_root(root, ["train", "test"])
        if folder_root is None:
            raise CstarError(f"{root} is neither CIFAR-10 python batches nor an image tree", f"expected: {layout}")
        classes = _class_dirs(folder_root / "train")
        if len(classes) != 10 or _class_dirs(folder_root / "test") != list(classes):
            raise CstarError(
                f"{folder_root}: expected the same 10 class folders in train/ and test/, found {classes}",
                f"expected layout: {layout}",
            )
        train_x, train_y = _load_image_tree(folder_root / "train", classes, image_size)
        test_x, test_y = _load_image_tree(folder_root / "test", classes, image_size)
    size = int(train_x.shape[-1])
    spec = DatasetSpec(
        name="cifar10",
        input_shape=(3, size, size),
        classes=tuple(classes),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        default_eps=8 / 255,
        path=str(root),
        options={"image_size": size, "format": "pickle" if pickle_root is not None else "imagefolder"},
    )
    train = TensorImageDataset(train_x, train_y, augment=augment, crop_pad=4 if augment else 0)
    return DataBundle(spec, train, TensorImageDataset(test_x, test_y))


# ------------------------------------------------------------------------------------- imagefolder


class ImageFolderDataset(Dataset):
    """Lazily decoded `split/<class>/<image>` tree with ImageNet-style transforms.

    Training with `augment`: RandomResizedCrop(size, scale 0.08-1) + horizontal flip. Otherwise
    (test split, held-out validation, augment off): resize the short side to size * 256/224, then
    center-crop size x size. Output: float32 CHW in [0, 1] (normalization is the model's).
    """

    def __init__(self, split_dir: Path, classes: Sequence[str], size: int, train: bool, augment: bool) -> None:
        from torchvision.transforms import v2 as T

        self.samples = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((split_dir / name).iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise CstarError(f"no images found under {split_dir}", f"expected {split_dir}/<class>/<image>.jpg")
        self.targets = [label for _, label in self.samples]
        self.size = size
        self.train = train
        self.augment = augment
        to_float = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
        self.train_transform = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), *to_float])
        self.test_transform = T.Compose([T.Resize(int(round(size * 256 / 224)), antialias=True), T.CenterCrop(size),
                                         *to_float])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        with open_image(path) as image:
            rgb = image.convert("RGB")
        transform = self.train_transform if self.train and self.augment else self.test_transform
        return transform(rgb).as_subclass(torch.Tensor), torch.tensor(label, dtype=torch.long)


@register_dataset("imagefolder", needs_path=True)
def _load_imagefolder(path: str | None, image_size: int | None, augment: bool) -> DataBundle:
    assert path is not None
    root = Path(path)
    layout = f"{root}/train/<class>/<image> and {root}/test/<class>/<image> (same class folders)"
    if not root.is_dir():
        raise CstarError(f"image folder {root} does not exist", f"expected layout: {layout}")
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise CstarError(f"{root} has no train/ and test/ folders", f"expected layout: {layout}")
    classes = _class_dirs(root / "train")
    if not classes or _class_dirs(root / "test") != classes:
        raise CstarError(f"{root}: train/ and test/ must hold the same class folders", f"expected layout: {layout}")
    size = 224 if image_size is None else image_size
    spec = DatasetSpec(
        name="imagefolder",
        input_shape=(3, size, size),
        classes=tuple(classes),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        default_eps=4 / 255,
        path=str(root),
        options={"image_size": size},
    )
    train = ImageFolderDataset(root / "train", classes, size, train=True, augment=augment)
    test = ImageFolderDataset(root / "test", classes, size, train=False, augment=False)
    return DataBundle(spec, train, test)

