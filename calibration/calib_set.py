"""Calibration sets: a deterministic, class-stratified slice of the TRAIN split, optionally mixed with PGD.

Host side (torch is imported for data loading and, when asked, for PGD on the PyTorch reference).
The test split is never used here, so calibration cannot leak into the accuracy the stage reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cstar.data import DatasetSpec, stratified_indices
from cstar.errors import CstarError
from export.reference import load_reference

CALIBRATION_SPLIT = "train"
PGD_STEPS = 10


@dataclass
class CalibrationSet:
    """Float32 NCHW images in [0, 1], the train-split indices they came from, and how many are adversarial."""

    images: np.ndarray
    indices: np.ndarray
    n_adversarial: int = 0
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    adversarial_mask: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=bool))
    attack: dict[str, Any] | None = None
    split: str = CALIBRATION_SPLIT

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def record(self, method: str, adversarial_fraction: float, seed: int, **after_method: Any) -> dict[str, Any]:
        """The start of a manifest's `calibration` block, the same for every target: how many images, the
        calibration method (then `after_method`, e.g. ExecuTorch's observer), which train-split images and how
        many of them adversarial; the caller adds its quantizer's settings."""
        return {"samples": len(self), "method": method, **after_method, "split": self.split,
                "indices": [int(i) for i in self.indices], "adversarial_fraction": float(adversarial_fraction),
                "n_adversarial": int(self.n_adversarial), "adversarial_attack": self.attack, "seed": seed}


def select_calibration_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Deterministic class-stratified choice of `n` indices into the train split (sorted, per-class counts within 1)."""
    labels = np.asarray(labels)
    if n <= 0:
        raise CstarError(f"calibration sample count must be positive, got {n}", "pass --samples N with N >= 1")
    if n > labels.shape[0]:
        raise CstarError(
            f"asked for {n} calibration samples but the train split has only {labels.shape[0]} images",
            f"pass --samples {labels.shape[0]} or fewer",
        )
    return stratified_indices(labels, n, seed)


def craft_pgd(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    eps: float,
    norm: str = "linf",
    steps: int = PGD_STEPS,
    seed: int = 0,
    batch_size: int = 256,
) -> np.ndarray:
    """PGD examples (random start, seeded) made on a torch model; float32 NCHW numpy in and out."""
    import torch

    from cstar.attacks import pgd

    out = np.empty_like(images, dtype=np.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, images.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32))
            y = torch.from_numpy(np.asarray(labels[start : start + batch_size], dtype=np.int64))
            adv = pgd(model, x, y, eps, steps=steps, norm=norm, random_start=True)
            out[start : start + x.shape[0]] = adv.detach().cpu().numpy()
    return out


def craft_apgd(model: Any, images: np.ndarray, labels: np.ndarray, eps: float, norm: str = "linf", seed: int = 0,
               n_iter: int = 100, n_targets: int = 3, batch_size: int = 256) -> dict[str, np.ndarray]:
    """The apgd suite's transfer examples made on a torch model (cstar.robust_eval.transfer_examples):
    {"apgd_ce": ..., "apgd_t": ...}, float32 NCHW numpy, seeded."""
    import torch

    from cstar.apgd import APGDConfig
    from cstar.robust_eval import transfer_examples

    ce = APGDConfig(loss="ce", norm=norm, n_iter=n_iter, seed=seed)
    targeted = APGDConfig(loss="dlr-targeted", norm=norm, n_iter=n_iter, n_targets=n_targets, seed=seed)
    out = {name: np.empty_like(images, dtype=np.float32) for name in ("apgd_ce", "apgd_t")}
    for start in range(0, images.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32))
        y = torch.from_numpy(np.asarray(labels[start : start + batch_size], dtype=np.int64))
        for name, adv in transfer_examples(model, x, y, eps, ce, targeted).items():
            out[name][start : start + x.shape[0]] = adv.cpu().numpy()
    return out


def build_calibration_set(
    spec: DatasetSpec | dict[str, Any],
    n: int,
    adversarial_fraction: float = 0.0,
    reference_dir: str | Path | None = None,
    seed: int = 0,
    eps: float | None = None,
    norm: str | None = None,
) -> CalibrationSet:
    """`n` stratified train images; with fraction f > 0, round(f*n) of them (class-stratified) replaced by PGD.

    PGD (10 steps, random start) runs on the PyTorch reference in `reference_dir`, at `eps`/`norm`
    (default: the reference manifest's threat model).
    """
    from cstar.data import load_dataset_from_spec, to_tensors

    spec = spec if isinstance(spec, DatasetSpec) else DatasetSpec.from_dict(spec)
    if not 0.0 <= adversarial_fraction <= 1.0:
        raise CstarError(
            f"adversarial fraction must be in [0, 1], got {adversarial_fraction}",
            "pass --include-adversarial 0.5 to make half of the calibration set PGD examples",
        )
    bundle = load_dataset_from_spec(spec)
    train_labels = bundle.labels(CALIBRATION_SPLIT)
    indices = select_calibration_indices(train_labels, n, seed)
    images_t, labels_t = to_tensors(bundle.train, indices)
    images = images_t.numpy().astype(np.float32, copy=False)
    labels = labels_t.numpy().astype(np.int64, copy=False)
    mask = np.zeros(images.shape[0], dtype=bool)
    n_adv = int(round(adversarial_fraction * images.shape[0]))
    attack: dict[str, Any] | None = None
    if n_adv > 0:
        if reference_dir is None:
            raise CstarError(
                "adversarial calibration samples need the PyTorch reference model, and none was given or found",
                "pass --reference DIR (the train/compress directory the ONNX model was exported from)",
            )
        model, ref_manifest = load_reference(reference_dir, spec)
        eps = float(ref_manifest.get("eps", spec.default_eps) if eps is None else eps)
        norm = str(ref_manifest.get("norm", "linf") if norm is None else norm)
        # Which images become adversarial: class-stratified positions, seeded apart from the selection.
        positions = stratified_indices(labels, n_adv, seed + 1)
        images[positions] = craft_pgd(model, images[positions], labels[positions], eps, norm, PGD_STEPS, seed)
        mask[positions] = True
        from cstar.attacks import AttackConfig

        attack = {**AttackConfig("pgd", eps, PGD_STEPS, None, norm, True).to_dict(), "on": str(reference_dir)}
    return CalibrationSet(
        images=np.ascontiguousarray(images, dtype=np.float32),
        indices=np.asarray(indices, dtype=np.int64),
        n_adversarial=int(mask.sum()),
        labels=labels,
        adversarial_mask=mask,
        attack=attack,
    )
