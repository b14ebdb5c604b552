"""One validation layer for user-given numbers and names (CLI flags, pipeline configs, the Python API).

Every check raises `CstarError(message, fix)` so the CLI prints one `error:` and one `  fix:` line and
exits 2, before any work starts. Torch-free and import-light on purpose: the device side (verify,
bench, predict) uses it too; Pillow is imported only by `open_image`.
"""

from __future__ import annotations

import math
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from cstar.errors import CstarError

# the largest image (width x height) any stage decodes: 8192 x 8192; a bigger one is refused before decoding
MAX_IMAGE_PIXELS = 8192 * 8192
# perturbation radii (Linf, [0,1] pixels) above which an eps is unusual for the dataset (a warning, not an error)
USUAL_EPS_MAX: dict[str, float] = {"digits": 0.5, "fashion-mnist": 0.5, "cifar10": 16 / 255, "imagefolder": 16 / 255}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def number(name: str, value: Any, hint: str | None = None) -> float:
    """`value` as a finite float; NaN, Inf, booleans and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise CstarError(f"{name} must be a number, got {value!r}", hint or f"pass a finite number for {name}")
    result = float(value)
    if not math.isfinite(result):
        raise CstarError(f"{name} must be a finite number, got {value!r}", hint or f"pass a finite number for {name}")
    return result


def in_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
             low_open: bool = False, high_open: bool = False, hint: str | None = None) -> float:
    """A finite number within [low, high] (either end open or absent); the range is named in the error."""
    result = number(name, value, hint)
    below = low is not None and (result <= low if low_open else result < low)
    above = high is not None and (result >= high if high_open else result > high)
    if below or above:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        span = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        raise CstarError(f"{name} must be in {span}, got {value!r}", hint or f"pass {name} within {span}")
    return result


def count(name: str, value: Any, minimum: int = 1, hint: str | None = None) -> int:
    """An integer >= `minimum` (booleans and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CstarError(f"{name} must be an integer >= {minimum}, got {value!r}",
                         hint or f"pass {name} {max(minimum, 1)} or more")
    return int(value)


def eps(value: Any, name: str = "--eps", dataset: str | None = None) -> float:
    """A perturbation radius in [0, 1] (inputs are [0,1] pixels); warns above the dataset's usual range."""
    result = in_range(name, value, 0.0, 1.0, hint=f"pass {name} in [0, 1] (inputs are [0,1] pixels, e.g. 0.2 "
                                                   "for digits, 8/255 = 0.0314 for CIFAR-10)")
    usual = USUAL_EPS_MAX.get(dataset or "")
    if usual is not None and result > usual:
        print(f"warning: {name} {result:g} is above the usual range for {dataset} (<= {usual:.4g}); "
              "almost no model stays robust there", file=sys.stderr)
    return result


def ratio(name: str, value: Any) -> float:
    """A compression ratio (dense / compressed): finite and > 1 (1 would compress nothing)."""
    return in_range(name, value, 1.0, None, low_open=True,
                    hint=f"pass {name} above 1, e.g. {name} 4 (dense / compressed)")


def fraction(name: str, value: Any, hint: str | None = None) -> float:
    """A number in [0, 1]."""
    return in_range(name, value, 0.0, 1.0, hint=hint)


def device(value: Any, name: str = "--device") -> str:
    """A torch device name: auto, cpu, mps, cuda or cuda:N."""
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
        raise CstarError(f"unknown {name} {value!r}", "use one of: auto, cpu, cuda, cuda:N, mps")
    return value


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of `choices` (names listed in the fix)."""
    if not isinstance(value, str) or value not in choices:
        raise CstarError(f"unknown {name} {value!r}", f"use one of: {', '.join(choices)}")
    return value


def classes(names: Sequence[Any], where: str) -> tuple[str, ...]:
    """A class list for training or evaluation: at least two distinct names (one class is no task)."""
    result = tuple(str(n) for n in names)
    if len(result) < 2:
        raise CstarError(f"{where} has {len(result)} class{'' if len(result) == 1 else 'es'} {list(result)}; "
                         "a classifier needs at least two", "add a folder per class (at least two classes)")
    if len(set(result)) != len(result):
        raise CstarError(f"{where} lists a class twice: {list(result)}", "give every class a distinct name")
    return result


def class_count(names: Sequence[Any], outputs: int, where: str) -> None:
    """A manifest's class list must name every model output (an empty list: outputs shown as indices)."""
    if names and len(names) != outputs:
        raise CstarError(f"{where} lists {len(names)} classes, but the model has {outputs} outputs",
                         "re-run the stage that wrote the directory (its manifest and model disagree)")


def confined_file(directory: str | os.PathLike[str], filename: Any, key: str = "file") -> Path:
    """directory/filename for a file named in a manifest, refused unless it stays inside `directory`.

    A manifest is data: an absolute path, a `..` part or a symlink that leads elsewhere would let a
    tampered manifest make cstar hash, open or copy any file of the machine.
    """
    where = f"{directory}/manifest.json"
    fix = "re-run the stage that wrote the directory (a manifest names files inside its own directory)"
    if not isinstance(filename, str) or not filename.strip():
        raise CstarError(f"{where}: {key} must be a file name, got {filename!r}", fix)
    parts = PurePosixPath(filename.replace("\\", "/")).parts
    if PurePosixPath(filename).is_absolute() or PureWindowsPath(filename).is_absolute() or ".." in parts \
            or PureWindowsPath(filename).drive:
        raise CstarError(f"{where}: {key} {filename!r} points outside its directory", fix)
    base = Path(directory).resolve()
    path = Path(directory) / filename
    if not path.resolve().is_relative_to(base):
        raise CstarError(f"{where}: {key} {filename!r} is a link that points outside its directory", fix)
    return path


def open_image(path: str | os.PathLike[str], limit: int = MAX_IMAGE_PIXELS) -> Any:
    """Open an image with Pillow, refusing more than `limit` pixels before decoding (a decompression bomb)."""
    import warnings

    from PIL import Image

    fix = f"downscale the image to at most {limit:,} pixels (e.g. {math.isqrt(limit)} x {math.isqrt(limit)})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise CstarError(f"{path} is too large to decode ({exc}); the limit is {limit:,} pixels", fix) from exc
    width, height = image.size
    if width * height > limit:
        image.close()
        raise CstarError(f"{path} is {width} x {height} = {width * height:,} pixels, above the limit of "
                         f"{limit:,} pixels", fix)
    return image


# ------------------------------------------------------------------------------------- typed configs


def describe_type(hint: Any) -> str:
    """Plain words for a field's type annotation ("an integer", "a list of strings", ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin in (list, tuple, Sequence):
        inner = [a for a in args if a is not Ellipsis]
        return f"a list of {describe_type(inner[0]).split(' ', 1)[1]}s" if inner else "a list"
    names = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
             type(None): "none", dict: "a table"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def matches_type(value: Any, hint: Any) -> bool:
    """Whether a config value (from TOML/YAML/JSON) has the field's annotated type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a) for a in args)
    if origin in (list, tuple, Sequence):
        inner = [a for a in args if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(matches_type(v, inner[0]) for v in value) if inner \
            else isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def typed_value(where: str, key: str, value: Any, hint: Any) -> Any:
    """`value` when it has the type `hint` says, else an error naming the key and the type wanted."""
    if not matches_type(value, hint):
        wanted = describe_type(hint)
        raise CstarError(f"{key} in {where} must be {wanted}, got {value!r} ({type(value).__name__})",
                         f"set {key} to {wanted} in {where}")
    return value
