"""`cstar predict`: classify images or .npy arrays on a runtime (device side, torch-free).

PNG/JPEG files need Pillow (imported lazily; a clear error when it is missing); .npy files always
work: CHW, HW or NCHW floats in [0,1], or uint8 pixels (scaled by 1/255).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError, MissingDependencyError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar predict`."""
    parser.add_argument("--artifact", required=True, help="export, calibrate or build directory")
    parser.add_argument("--backend", default=None, help="runtime backend (default: the artifact's build backend or ort-cpu)")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per input (default 5)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text lines")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG/JPEG images or .npy arrays")


def main(args: argparse.Namespace) -> int:
    """CLI entry: classify every input and print the top-k per image."""
    results = run_predict(args.artifact, args.inputs, backend=args.backend, top_k=args.top_k)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for item in results:
            top = ", ".join(f"{c['class']} ({c['score']:.3f})" for c in item["top"])
            print(f"{item['file']}{'' if item['index'] is None else '[' + str(item['index']) + ']'}: {top}")
    return 0


def _pil_image(path: Path) -> Any:
    try:
        from PIL import UnidentifiedImageError
    except ImportError as exc:
        raise MissingDependencyError("Pillow", None, f"reading the image {path}") from exc
    from cstar.validate import open_image

    try:
        image = open_image(path)
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise CstarError(f"{path} is not a readable image ({exc})", "pass a PNG/JPEG image or a .npy array") from exc
    return image


def preprocess_image(path: str | Path, input_shape: tuple[int, int, int] | list[int]) -> np.ndarray:
    """A PNG/JPEG file -> float32 (C, H, W) in [0,1]: grayscale or RGB per C, resized to H x W."""
    channels, height, width = (int(d) for d in input_shape)
    if channels not in (1, 3):
        raise CstarError(f"images can only feed 1- or 3-channel models; this one takes {channels}",
                         "pass .npy arrays shaped (C, H, W) instead")
    image = _pil_image(Path(path)).convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        from PIL import Image

        image = image.resize((width, height), getattr(Image, "Resampling", Image).BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(array, dtype=np.float32)


def load_npy(path: str | Path, input_shape: tuple[int, int, int] | list[int]) -> np.ndarray:
    """A .npy file -> float32 (N, C, H, W) in [0,1] (HW, CHW or NCHW; uint8 scaled by 1/255)."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CstarError(f"{path} is not a readable .npy array ({exc})", "save arrays with numpy.save") from exc
    shape = tuple(int(d) for d in input_shape)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif not np.issubdtype(array.dtype, np.floating):
        raise CstarError(f"{path} holds {array.dtype} values", "store float pixels in [0,1] or uint8 pixels")
    if array.ndim == 2 and shape[0] == 1:
        array = array[None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim == 4 and array.shape[0] == 0:
        raise CstarError(f"{path} holds no images (shape {array.shape})", "save at least one image in the array")
    if array.ndim != 4 or tuple(array.shape[1:]) != shape:
        raise CstarError(f"{path} has shape {array.shape}, the model takes (N,) {shape}",
                         "save arrays shaped (C, H, W), (H, W) for 1 channel, or (N, C, H, W)")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min(initial=0) < 0 or array.max(initial=0) > 1:
        raise CstarError(f"{path} has values outside [0, 1] (or NaN)", "scale pixels to [0, 1] (uint8: divide by 255)")
    return array


def load_inputs(paths: list[str], input_shape: tuple[int, int, int]) -> tuple[np.ndarray, list[tuple[str, int | None]]]:
    """Stack every input into one batch; returns (batch, [(file, index in file or None)])."""
    batches, labels = [], []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            raise CstarError(f"input {path} is a directory", f"pass the files in it, e.g. {path}/*.png")
        if not path.is_file():
            raise CstarError(f"input {path} does not exist", "pass existing image or .npy files")
        if path.suffix.lower() == ".npy":
            array = load_npy(path, input_shape)
            batches.append(array)
            labels += [(name, i if array.shape[0] > 1 else None) for i in range(array.shape[0])]
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            batches.append(preprocess_image(path, input_shape)[None])
            labels.append((name, None))
        else:
            raise CstarError(f"{path}: unsupported input type '{path.suffix}'",
                             f"pass images ({', '.join(IMAGE_SUFFIXES)}) or .npy arrays")
    return np.concatenate(batches, axis=0), labels


def run_predict(artifact_dir: str | Path, inputs: list[str], backend: str | None = None, top_k: int = 5
                ) -> list[dict[str, Any]]:
    """Classify `inputs` with the artifact; [{file, index, top: [{class, score}]}]."""
    import deploy

    if top_k < 1:
        raise CstarError(f"--top-k must be >= 1, got {top_k}", "e.g. --top-k 5")
    with deploy.load(artifact_dir, backend) as predictor:
        batch, labels = load_inputs(inputs, predictor.artifact.input_shape)
        ranked = predictor.classify(batch, top_k)
    return [{"file": name, "index": index, "top": [{"class": c, "score": s} for c, s in top]}
            for (name, index), top in zip(labels, ranked, strict=True)]
