"""Stage manifests: the contract between stages (see shared/design.md).

Torch-free on purpose: the device side reads manifests too. Writes are atomic (temp file then
rename) so a crash never leaves a half-written file that a later stage would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from cstar.errors import CstarError

SCHEMA_VERSION = 2  # 2: metrics.robust_acc is an attack suite's worst case, metrics.attack the suite block
MANIFEST_NAME = "manifest.json"
STAGES = ("train", "compress", "export", "calibrate", "build", "attackset")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write bytes to `path` through a temp file in the same directory and an atomic rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomic text write (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomic JSON write, pretty-printed, keys in insertion order."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path beside `path` for a writer that needs a filename; renamed onto `path` when the block
    succeeds, removed when it raises (the one atomic-write rule for files written by other libraries)."""
    tmp = atomic_target(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_target(path: str | os.PathLike[str]) -> Path:
    """A temp path beside `path` for writers that need a filename (torch, onnx); rename with os.replace."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix or ".tmp", dir=target.parent)
    os.close(fd)
    return Path(tmp)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def file_entry(path: str | os.PathLike[str]) -> dict[str, str]:
    """{path, sha256} for a manifest's `inputs` list."""
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}


def library_versions(names: Iterable[str] = ("torch", "onnx", "onnxruntime", "tensorrt")) -> dict[str, str]:
    """Installed versions of the named distributions (absent ones are left out), plus python."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(out_dir: str | os.PathLike[str], stage: str, body: dict[str, Any]) -> Path:
    """Write `out_dir/manifest.json` with schema_version, stage and versions filled in.

    The manifest is written last by every stage: its presence marks the directory complete.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    manifest: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "stage": stage}
    manifest.update(body)
    manifest.setdefault("inputs", [])
    manifest.setdefault("versions", library_versions())
    return atomic_write_json(Path(out_dir) / MANIFEST_NAME, manifest)


def read_manifest(directory: str | os.PathLike[str], stages: Iterable[str] | None = None) -> dict[str, Any]:
    """Read and sanity-check `directory/manifest.json`; clear errors for missing or corrupt ones."""
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        raise CstarError(f"directory {directory} does not exist", "pass the output directory of the previous stage")
    if not path.is_file():
        raise CstarError(
            f"{path} is missing: {directory} is not a finished stage directory (a crashed or half-written run?)",
            "re-run the stage that produces it",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CstarError(f"{path} is corrupt ({exc})", "re-run the stage that produces it") from exc
    if not isinstance(manifest, dict) or "schema_version" not in manifest or "stage" not in manifest:
        raise CstarError(f"{path} is not a cstar manifest (no schema_version/stage)", "re-run the stage")
    version, stage = manifest["schema_version"], manifest["stage"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CstarError(f"{path} has schema_version {version!r}; it must be a positive integer",
                         "re-run the stage that produces it (the manifest was edited or written by another tool)")
    if not isinstance(stage, str):
        raise CstarError(f"{path} has stage {stage!r}; expected one of {list(STAGES)}",
                         "re-run the stage that produces it (the manifest was edited or written by another tool)")
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise CstarError(
            f"{path} has schema_version {manifest['schema_version']}, newer than this cstar ({SCHEMA_VERSION})",
            "upgrade cstar",
        )
    allowed = tuple(stages) if stages is not None else None
    if allowed is not None and manifest["stage"] not in allowed:
        raise CstarError(
            f"{directory} holds a '{manifest['stage']}' artifact, but this command needs one of {list(allowed)}",
            "pass the directory written by the right stage",
        )
    return manifest


def verify_file(directory: str | os.PathLike[str], filename: str, expected_sha256: str) -> Path:
    """Return directory/filename after checking it stays inside `directory`, exists and matches the sha256."""
    from cstar.validate import confined_file

    path = confined_file(directory, filename)
    if not isinstance(expected_sha256, str):
        raise CstarError(f"{directory}/{MANIFEST_NAME}: the sha256 of {filename} is {expected_sha256!r}",
                         "re-run the stage that produces it")
    if not path.is_file():
        raise CstarError(f"{path} is missing", "re-run the stage that produces it")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise CstarError(
            f"{path} does not match the sha256 in its manifest (corrupt or modified: {actual[:12]}... != "
            f"{expected_sha256[:12]}...)",
            "re-run the stage that produces it",
        )
    return path


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor() or the machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dataset_name(value: Any) -> str | None:
    """The dataset name of a manifest's `dataset` entry (a spec dict or a plain name)."""
    if isinstance(value, dict):
        return value.get("name")
    return None if value is None else str(value)
