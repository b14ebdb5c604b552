"""`split/<class>/<image>` trees: their class folders and a cached decode into one uint8 tensor."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cstar.errors import CstarError
from cstar.validate import open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


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
