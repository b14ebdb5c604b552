"""Loading deployable artifacts (export, calibrate and build directories) and a simple predictor.

Torch-free. The model file is always checked against the sha256 its manifest records before use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError
from cstar.manifest import read_manifest, verify_file
from cstar.validate import class_count, confined_file
from deploy.backends.base import Runner
from deploy.backends.registry import backend_names, create_runner

ARTIFACT_STAGES = ("export", "calibrate", "build")
DEFAULT_BACKEND = "ort-cpu"
PTE_SUFFIX, PTE_BACKEND = ".pte", "executorch-xnnpack"  # ExecuTorch programs (calibrate --target executorch)


@dataclass
class Artifact:
    """A verified deployable model: where it is, what it is, and how it was built."""

    directory: Path
    manifest: dict[str, Any]
    stage: str
    model_path: Path
    precision: str
    input_shape: tuple[int, int, int]
    classes: list[str]
    eps: float | None
    norm: str | None
    build: dict[str, Any] | None

    @property
    def backend(self) -> str | None:
        """The backend a build directory was made for (None for export/calibrate)."""
        return None if self.build is None else self.build.get("backend")

    @property
    def default_backend(self) -> str:
        """Where it runs when no backend is named: its build's, executorch-xnnpack for a .pte, else ort-cpu."""
        if self.backend:
            return str(self.backend)
        return PTE_BACKEND if self.model_path.suffix == PTE_SUFFIX else DEFAULT_BACKEND

    @property
    def sha256(self) -> str:
        """sha256 of the model file (from the verified manifest)."""
        return str(_model_entry(self.manifest, self.directory)["sha256"])


def _model_entry(manifest: dict[str, Any], directory: Path) -> dict[str, Any]:
    # build dirs and ExecuTorch calibrate dirs (model.pte) name their model file under 'artifact'
    key = "artifact" if manifest["stage"] == "build" or ("artifact" in manifest and "onnx" not in manifest) else "onnx"
    entry = manifest.get(key)
    if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
        raise CstarError(
            f"{directory}/manifest.json has no '{key}' {{file, sha256}} entry",
            f"re-run `cstar {manifest['stage']}` to rewrite the directory",
        )
    return entry


def _classes(manifest: dict[str, Any]) -> list[str]:
    classes = manifest.get("classes")
    if classes is None and isinstance(manifest.get("dataset"), dict):
        classes = manifest["dataset"].get("classes")
    return [str(c) for c in classes] if classes else []


def _input_shape(manifest: dict[str, Any], directory: Path) -> tuple[int, int, int]:
    shape = (manifest.get("input") or {}).get("shape")
    if shape is None and isinstance(manifest.get("dataset"), dict):
        shape = manifest["dataset"].get("input_shape")
    if shape is None or len(shape) != 3:
        raise CstarError(
            f"{directory}/manifest.json has no input.shape [C, H, W]", "re-run the stage that wrote the directory"
        )
    return int(shape[0]), int(shape[1]), int(shape[2])


def load_artifact(directory: str | Path) -> Artifact:
    """Read and verify an export, calibrate or build directory."""
    directory = Path(directory)
    manifest = read_manifest(directory, stages=ARTIFACT_STAGES)
    stage = str(manifest["stage"])
    entry = _model_entry(manifest, directory)
    try:
        model_path = verify_file(directory, str(entry["file"]), str(entry["sha256"]))
    except CstarError as exc:
        raise CstarError(
            f"{exc.message} (model file of the '{stage}' artifact, checked against its sha256)",
            f"re-run `cstar {stage}` to regenerate {directory}" + (" from its source" if stage == "build" else ""),
        ) from exc
    build = manifest.get("build") if stage == "build" else None
    if stage == "build" and not isinstance(build, dict):
        raise CstarError(f"{directory}/manifest.json has no 'build' section", "re-run `cstar build`")
    precision = manifest.get("precision") or ("int8" if stage == "calibrate" else "fp32")
    eps = manifest.get("eps")
    return Artifact(
        directory=directory,
        manifest=manifest,
        stage=stage,
        model_path=model_path,
        precision=str(precision),
        input_shape=_input_shape(manifest, directory),
        classes=_classes(manifest),
        eps=float(eps) if eps is not None else None,
        norm=manifest.get("norm"),
        build=build,
    )


def runner_options_from_build(build: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Runner options recorded in a build manifest/build.json (relative paths resolved in `directory`)."""
    options: dict[str, Any] = dict(build.get("runner_options") or {})
    for key, value in list(options.items()):
        if key.endswith("_path") and isinstance(value, str) and not Path(value).is_absolute():
            # relative: inside the build directory (an absolute path is a user-chosen cache, e.g. --timing-cache)
            options[key] = str(confined_file(directory, value, f"runner_options.{key}"))
    if build.get("backend") == "tensorrt":
        options.setdefault("build_info", build)
    return options


def open_runner(artifact: Artifact, backend: str | None = None, **options: Any) -> Runner:
    """An inactive runner for `artifact` (build dirs: their own backend; others: `default_backend`)."""
    if backend is not None and backend not in backend_names():
        raise CstarError(f"unknown backend '{backend}'", f"use one of: {', '.join(backend_names())}")
    if artifact.build is not None:
        built_for = str(artifact.build.get("backend"))
        if backend is not None and backend != built_for:
            raise CstarError(
                f"{artifact.directory} was built for backend '{built_for}', not '{backend}'",
                f"use --backend {built_for}, or run `cstar build --from <export or calibrate dir> --backend {backend}`",
            )
        merged = runner_options_from_build(artifact.build, artifact.directory)
        merged.update(options)
        return create_runner(built_for, artifact.model_path, **merged)
    chosen = backend or artifact.default_backend
    is_pte = artifact.model_path.suffix == PTE_SUFFIX
    if is_pte != (chosen == PTE_BACKEND):
        what = "an ExecuTorch program (.pte)" if is_pte else "an ONNX model"
        fix = (f"use --backend {PTE_BACKEND} or leave --backend out" if is_pte else
               "run `cstar calibrate --from EXPORT_DIR --target executorch ...` (INT8) and use its directory"
               if artifact.stage == "calibrate" else
               f"run `cstar build --from {artifact.directory} --backend {PTE_BACKEND} --out DIR` and use DIR")
        raise CstarError(f"{artifact.directory} holds {what}, which the '{chosen}' backend does not run", fix)
    if chosen == "tensorrt":
        raise CstarError(
            f"{artifact.directory} is a '{artifact.stage}' directory (ONNX), but the tensorrt backend runs engines",
            f"run `cstar build --from {artifact.directory} --backend tensorrt --out DIR` and use DIR",
        )
    return create_runner(chosen, artifact.model_path, **options)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class Predictor:
    """`deploy.load(dir).predict(x)`: a reusable, lazily activated runner plus class names."""

    def __init__(self, artifact: Artifact, backend: str | None = None, **options: Any) -> None:
        self.artifact = artifact
        self.runner = open_runner(artifact, backend, **options)

    @property
    def backend(self) -> str:
        """Name of the backend the predictions come from."""
        return self.runner.name

    @property
    def classes(self) -> list[str]:
        """Class names from the manifest (may be empty)."""
        return self.artifact.classes

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 logits (N, classes) for float32 NCHW pixels in [0, 1]."""
        if not self.runner.is_active:
            self.runner.activate()
        return self.runner.predict(x)

    __call__ = predict

    def classify(self, x: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (class name, softmax score) per image."""
        probs = _softmax(self.predict(x).astype(np.float64))
        k = max(1, min(int(k), probs.shape[1]))
        names = self.classes
        class_count(names, probs.shape[1], f"{self.artifact.directory}/manifest.json")
        result: list[list[tuple[str, float]]] = []
        for row in probs:
            top = np.argsort(-row, kind="stable")[:k]
            result.append([(names[i] if i < len(names) else str(i), float(row[i])) for i in top])
        return result

    def describe(self) -> dict[str, Any]:
        """The runner's description plus the artifact's directory, stage and precision."""
        info = self.runner.describe()
        info["artifact"] = {"path": str(self.artifact.directory), "stage": self.artifact.stage,
                            "precision": self.artifact.precision, "sha256": self.artifact.sha256}
        return info

    def close(self) -> None:
        """Release the runtime session / engine."""
        self.runner.deactivate()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
