"""Any `train/<class>/<image>` + `test/<class>/<image>` tree, decoded lazily with ImageNet-style transforms."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cstar.data.image_tree import IMAGE_SUFFIXES, _class_dirs
from cstar.data.registry import register_dataset
from cstar.data.spec import DatasetSpec
from cstar.data.tensors import DataBundle
from cstar.errors import CstarError
from cstar.validate import open_image


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
