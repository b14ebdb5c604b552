"""`cstar attackset`: craft the transfer attack set on the PyTorch reference (host side, torch).

The set is what the device-side `cstar verify` replays on the runtime without torch: clean inputs,
labels, white-box PGD and FGSM adversarial inputs crafted on the reference, and the reference's
logits on each. Written as SET_DIR/attackset.npz (atomic), then manifest.json (stage `attackset`).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cstar import validate
from cstar.errors import CstarError
from cstar.manifest import (
    MANIFEST_NAME,
    atomic_write_bytes,
    file_entry,
    read_manifest,
    sha256_file,
    write_manifest,
)

SET_FILE = "attackset.npz"
ATTACKS = ("pgd", "fgsm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar attackset`."""
    parser.add_argument("--reference", required=True, help="train/compress directory of the PyTorch reference")
    parser.add_argument("--data", required=True, help="dataset (name or name:path); must match the reference's")
    parser.add_argument("--samples", type=int, default=500,
                        help="stratified subset of the test split (default 500; 0 = the whole split)")
    parser.add_argument("--eps", type=float, default=None, help="attack radius (default: the reference manifest's eps)")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and PGD random-start seed")
    parser.add_argument("--batch-size", type=int, default=256, help="attack batch size")
    parser.add_argument("--out", required=True, help="output directory for attackset.npz + manifest.json")
    parser.add_argument("--force", action="store_true", help="replace an existing attack set directory at --out")


def main(args: argparse.Namespace) -> int:
    """CLI entry: craft the set and print a one-line summary."""
    manifest = run_attackset(args.reference, args.data, args.out, samples=args.samples, eps=args.eps,
                             steps=args.steps, seed=args.seed, batch_size=args.batch_size, force=args.force)
    metrics = manifest["metrics"]
    print(f"attackset: n={manifest['set']['n']} eps={manifest['eps']} clean={metrics['clean_acc']:.4f} "
          f"pgd={metrics['robust_acc']:.4f} fgsm={metrics['fgsm_robust_acc']:.4f} -> {args.out}")
    return 0


def _check_dataset(data: str, reference_dataset: dict[str, Any]) -> None:
    from cstar.data import parse_dataset_arg

    name, _ = parse_dataset_arg(data)
    if name != reference_dataset["name"]:
        raise CstarError(f"--data {data} does not match the reference's dataset '{reference_dataset['name']}'",
                         f"pass --data {reference_dataset['name']} (the dataset the reference was trained on)")


def _select(labels: np.ndarray, samples: int, seed: int) -> np.ndarray:
    from cstar.data import stratified_indices

    if samples < 0:
        raise CstarError(f"--samples must be >= 0, got {samples}", "pass a positive count, or 0 for the whole test split")
    if samples == 0 or samples >= labels.shape[0]:
        return np.arange(labels.shape[0], dtype=np.int64)
    return stratified_indices(labels, samples, seed)


def _attack_configs(eps: float, norm: str, steps: int) -> dict[str, Any]:
    from cstar.attacks import AttackConfig

    fast = AttackConfig("fgsm", eps, 1, eps, norm, random_start=False)
    return {"pgd": AttackConfig("pgd", eps, steps, None, norm, random_start=True), "fgsm": fast}


def _craft(model: Any, images: Any, labels: Any, configs: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """Adversarial inputs per attack and logits (clean + per attack), batched, as numpy."""
    import torch

    from cstar.attacks import pgd

    out: dict[str, list[np.ndarray]] = {"ref_logits_clean": []}
    for name in configs:
        out[f"adv_{name}"], out[f"ref_logits_{name}"] = [], []
    for start in range(0, images.shape[0], batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        with torch.no_grad():
            out["ref_logits_clean"].append(model(x).float().numpy())
        for name, cfg in configs.items():
            adv = pgd(model, x, y, cfg.eps, cfg.steps, cfg.resolved_step_size(), cfg.norm, cfg.random_start)
            with torch.no_grad():
                out[f"ref_logits_{name}"].append(model(adv).float().numpy())
            out[f"adv_{name}"].append(adv.numpy().astype(np.float32))
    return {key: np.concatenate(chunks) for key, chunks in out.items()}


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean()) if labels.size else 0.0


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    # numpy's stub also matches **kwds against `allow_pickle: bool`; every value here is an array.
    named: dict[str, Any] = arrays
    np.savez_compressed(buffer, **named)
    atomic_write_bytes(path, buffer.getvalue())


def run_attackset(
    reference: str | Path,
    data: str,
    out: str | Path,
    samples: int = 500,
    eps: float | None = None,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    force: bool = False,
) -> dict[str, Any]:
    """Craft PGD/FGSM inputs on the reference for a stratified test subset; write the set and its manifest.

    `out` follows cstar.outdir's rule (`force` replaces an existing attackset directory).
    """
    import torch

    from cstar.checkpoint import load_checkpoint
    from cstar.data import load_dataset, to_tensors
    from cstar.outdir import OutputDir, dataset_path

    started = time.perf_counter()
    if eps is not None:
        validate.eps(eps)  # before the model is loaded
    claim = OutputDir(Path(out), "attackset", (reference, dataset_path(data)), force=force)
    model, ref_manifest = load_checkpoint(reference)
    _check_dataset(data, ref_manifest["dataset"])
    ref_eps = ref_manifest.get("eps")
    if eps is not None and isinstance(ref_eps, (int, float)) and abs(float(ref_eps) - eps) > 1e-9:
        print(f"warning: --eps {eps:g} differs from the reference's eps {float(ref_eps):g}; `cstar verify` accepts "
              f"this set only for an artifact whose threat model is eps {eps:g}", file=sys.stderr)
    eps = float(ref_manifest.get("eps", 0.0) if eps is None else eps)
    norm = str(ref_manifest.get("norm", "linf"))
    validate.eps(eps, "--eps", str(ref_manifest["dataset"].get("name")))
    validate.count("--steps", steps)
    validate.count("--batch-size", batch_size)
    input_shape = tuple(ref_manifest["dataset"]["input_shape"])
    bundle = load_dataset(data, image_size=input_shape[-1])
    if tuple(bundle.spec.input_shape) != input_shape:
        raise CstarError(f"--data {data} gives inputs {bundle.spec.input_shape}, the reference expects {input_shape}",
                         "pass the dataset (and path) the reference was trained on")
    indices = _select(bundle.labels("test"), samples, seed)
    images, labels = to_tensors(bundle.test, indices)
    torch.manual_seed(seed)
    configs = _attack_configs(eps, norm, steps)
    arrays = _craft(model, images, labels, configs, batch_size)
    y = labels.numpy().astype(np.int64)
    arrays = {"x_clean": images.numpy().astype(np.float32), "labels": y, "indices": indices.astype(np.int64), **arrays}
    with claim as out_dir:  # staged sibling, renamed into place once set and manifest are written
        _write_set(out_dir, arrays, reference, ref_manifest, eps, norm, input_shape, seed, configs, started)
    return read_manifest(out, ("attackset",))


def _write_set(out_dir: Path, arrays: dict[str, np.ndarray], reference: str | Path, ref_manifest: dict[str, Any],
               eps: float, norm: str, input_shape: tuple[int, ...], seed: int, configs: dict[str, Any],
               started: float) -> None:
    """attackset.npz, then manifest.json (last) into `out_dir`."""
    from cstar.checkpoint import WEIGHTS_NAME

    y = arrays["labels"]
    _save_npz(out_dir / SET_FILE, arrays)
    body = {
        "inputs": [file_entry(Path(reference) / MANIFEST_NAME),
                   file_entry(Path(reference) / ref_manifest.get("weights", {}).get("file", WEIGHTS_NAME))],
        "dataset": ref_manifest["dataset"],
        "model": ref_manifest["model"],
        "eps": eps,
        "norm": norm,
        "classes": list(ref_manifest["dataset"]["classes"]),
        "input": {"shape": list(input_shape), "dtype": "float32", "range": [0, 1]},
        "set": {"file": SET_FILE, "sha256": sha256_file(out_dir / SET_FILE), "n": int(y.shape[0]),
                "seed": seed, "attacks": {name: cfg.to_dict() for name, cfg in configs.items()}},
        "metrics": {
            "clean_acc": _accuracy(arrays["ref_logits_clean"], y),
            "robust_acc": _accuracy(arrays["ref_logits_pgd"], y),
            "fgsm_robust_acc": _accuracy(arrays["ref_logits_fgsm"], y),
            "attack": configs["pgd"].to_dict(),
        },
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_manifest(out_dir, "attackset", body)
