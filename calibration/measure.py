"""How calibrate (ONNX and ExecuTorch targets alike) measures an INT8 model: sessions, logits, parity,
accuracy, the transfer sets' per-example worst case, and where the PyTorch reference is.

One module below both `calibration.calibrate` and `calibration.executorch_lower`, so neither imports
the other's private helpers. Torch-free except `torch_logits` (imports torch when called).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from calibration.execution import ORT_CPU, Execution, open_session, run_logits
from cstar.errors import CstarError
from cstar.manifest import MANIFEST_NAME, read_manifest, sha256_file
from cstar.ort_cpu import accuracy as ort_accuracy
from cstar.ort_cpu import compare_logits

REFERENCE_STAGES = ("train", "compress")
EVAL_APGD_ITERS = 100  # the apgd suite's transfer check (APGD-CE + APGD-T over 3 targets)
EVAL_APGD_TARGETS = 3


def find_reference(export_manifest: dict[str, Any]) -> tuple[Path | None, str | None]:
    """The train/compress directory among the export manifest's inputs, or (None, why not)."""
    why = "the export manifest lists no train/compress manifest among its inputs"
    for entry in export_manifest.get("inputs", []):
        path = Path(str(entry.get("path", "")))
        if path.name != MANIFEST_NAME:
            continue
        directory = path.parent
        try:
            manifest = read_manifest(directory)
        except CstarError as exc:
            why = f"the reference recorded in the export manifest is unusable: {exc.message}"
            continue
        if manifest.get("stage") not in REFERENCE_STAGES:
            continue
        if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            why = f"{path} changed since export (sha256 differs); pass --reference explicitly if intended"
            continue
        return directory, None
    return None, why


def session(path: Path, execution: Execution | str = ORT_CPU) -> Any:
    """ONNX Runtime CPU session of `path` executed as `execution` (calibration.execution, the one source)."""
    return open_session(path, execution)


def run_logits_of(session: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return run_logits(session, images, batch_size)


def parity(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """max |a - b|, top-1 agreement and n (cstar.ort_cpu.compare_logits)."""
    return compare_logits(b, a)


def torch_logits(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).float().numpy()


def worst_case(run: Any, sets: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Share of examples every transfer set leaves correctly classified by `run` (logits of a batch)."""
    correct = np.ones(labels.shape[0], dtype=bool)
    for adv in sets.values():
        correct &= np.asarray(run(adv)).argmax(axis=1) == labels
    return float(correct.mean()) if labels.size else 0.0


def transfer_block(eps: float, norm: str, seed: int) -> dict[str, Any]:
    """metrics.attack of calibrate: the apgd suite crafted on the PyTorch reference, replayed on FP32 and INT8."""
    return {"suite": "apgd", "transfer": True, "crafted_on": "pytorch-reference", "eps": eps, "norm": norm,
            "seed": seed, "attacks": [{"name": "apgd-ce", "n_iter": EVAL_APGD_ITERS},
                                      {"name": "apgd-t", "n_iter": EVAL_APGD_ITERS, "n_targets": EVAL_APGD_TARGETS}],
            "worst_case": "per example over every set"}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (cstar.ort_cpu.accuracy)."""
    return ort_accuracy(logits, labels)
