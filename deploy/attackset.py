"""`cstar attackset`: craft the transfer attack set on the PyTorch reference (host side, torch).

The set is what the device-side `cstar verify` replays on the runtime without torch: clean inputs,
labels, white-box adversarial inputs crafted on the reference, and the reference's logits on each.
The attacks are the white-box half of the named suite (cstar.robust_eval): APGD-CE on every point,
APGD-T (targeted DLR) on the points APGD-CE left robust on the reference (the others carry
APGD-CE's example, already adversarial there), plus PGD-20 and FGSM for comparison with older sets.
`metrics.robust_acc` is the reference's per-example worst case over all of them. Written as
SET_DIR/attackset.npz (atomic), then manifest.json (stage `attackset`).
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
    dataset_name,
    file_entry,
    read_manifest,
    sha256_file,
    verify_file,
    write_manifest,
)

SET_FILE = "attackset.npz"
ATTACKS = ("apgd_ce", "apgd_t", "pgd", "fgsm")
TWIN_SUFFIX = "_fq"  # sets crafted on the fake-quant twin of an INT8 artifact (--quantized)
TWIN_ATTACKS = tuple(f"{name}{TWIN_SUFFIX}" for name in ("apgd_ce", "apgd_t"))
SET_SUITES = ("aa", "apgd")  # their white-box attacks; Square runs on the runtime itself (cstar verify)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar attackset`."""
    parser.add_argument("--reference", required=True, help="train/compress directory of the PyTorch reference")
    parser.add_argument("--data", required=True, help="dataset (name or name:path); must match the reference's")
    parser.add_argument("--samples", type=int, default=500,
                        help="stratified subset of the test split (default 500; 0 = the whole split)")
    parser.add_argument("--eps", type=float, default=None, help="attack radius (default: the reference manifest's eps)")
    parser.add_argument("--suite", default="aa", choices=SET_SUITES,
                        help="white-box attacks of this suite craft the set: aa (APGD-CE, APGD-T over 9 targets) "
                             "or apgd (APGD-T over 3 targets)")
    parser.add_argument("--iters", type=int, default=None, help="APGD iterations (default: the suite's, 100)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the PGD comparison set (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and PGD random-start seed")
    parser.add_argument("--batch-size", type=int, default=256, help="attack batch size")
    parser.add_argument("--quantized", default=None, metavar="CALIBRATE_DIR",
                        help="also craft the suite's APGD-CE/APGD-T on the fake-quant twin of this INT8 (ONNX "
                             "Q/DQ) calibrate directory (sets apgd_ce_fq, apgd_t_fq): the white-box attack on the "
                             "INT8 model that `cstar verify` of its build should replay")
    parser.add_argument("--out", required=True, help="output directory for attackset.npz + manifest.json")
    parser.add_argument("--force", action="store_true", help="replace an existing attack set directory at --out")


def main(args: argparse.Namespace) -> int:
    """CLI entry: craft the set and print a one-line summary."""
    manifest = run_attackset(args.reference, args.data, args.out, samples=args.samples, eps=args.eps,
                             steps=args.steps, seed=args.seed, batch_size=args.batch_size, force=args.force,
                             suite=args.suite, iters=args.iters, quantized=args.quantized)
    metrics = manifest["metrics"]
    each = " ".join(f"{name}={acc:.4f}" for name, acc in metrics["per_attack"].items())
    print(f"attackset: n={manifest['set']['n']} eps={manifest['eps']} clean={metrics['clean_acc']:.4f} "
          f"worst={metrics['robust_acc']:.4f} ({each}){_twin_summary(manifest)} -> {args.out}")
    return 0


def _twin_summary(manifest: dict[str, Any]) -> str:
    twin = manifest["set"].get("quantized")
    return (f"; INT8 twin clean={twin['twin_clean_acc']:.4f} white-box worst={twin['twin_robust_acc']:.4f}"
            if twin else "")


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


def _attack_configs(eps: float, norm: str, steps: int, suite: str = "aa", iters: int | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """Each attack of the set: APGDConfig for apgd_ce / apgd_t, AttackConfig for pgd / fgsm."""
    from cstar.apgd import APGDConfig
    from cstar.attacks import AttackConfig
    from cstar.suites import suite_settings

    if suite not in SET_SUITES:
        raise CstarError(f"unknown attack-set suite '{suite}'", f"use one of: {', '.join(SET_SUITES)}")
    settings = suite_settings(suite, **({"n_iter": iters} if iters is not None else {}), seed=seed)
    def apgd(loss: str) -> APGDConfig:
        return APGDConfig(loss=loss, norm=norm, n_iter=settings.n_iter, n_restarts=settings.n_restarts,
                          n_targets=settings.n_targets, seed=seed)

    return {"apgd_ce": apgd("ce"), "apgd_t": apgd("dlr-targeted"),
            "pgd": AttackConfig("pgd", eps, steps, None, norm, random_start=True),
            "fgsm": AttackConfig("fgsm", eps, 1, eps, norm, random_start=False)}


def _adversarial(name: str, cfg: Any, model: Any, x: Any, y: Any, eps: float, crafted: dict[str, Any],
                 configs: dict[str, Any]) -> Any:
    """One attack's inputs for a batch (the APGD pair from cstar.robust_eval.transfer_examples)."""
    from cstar.attacks import pgd
    from cstar.robust_eval import transfer_examples

    if name in ("apgd_ce", "apgd_t"):
        if "apgd_t" not in crafted:
            crafted.update(transfer_examples(model, x, y, eps, configs["apgd_ce"], configs["apgd_t"]))
        return crafted[name]
    return pgd(model, x, y, cfg.eps, cfg.steps, cfg.resolved_step_size(), cfg.norm, cfg.random_start)


def _craft(model: Any, images: Any, labels: Any, configs: dict[str, Any], batch_size: int,
           eps: float, twin: Any = None) -> dict[str, np.ndarray]:
    """Adversarial inputs per attack and the reference's logits (clean + per attack), batched, as numpy.
    With a fake-quant `twin`, its APGD pair is crafted on the twin too (names with TWIN_SUFFIX)."""
    import torch

    from cstar.robust_eval import transfer_examples

    names = [*configs, *(TWIN_ATTACKS if twin is not None else ())]
    out: dict[str, list[np.ndarray]] = {"ref_logits_clean": []}
    for name in names:
        out[f"adv_{name}"], out[f"ref_logits_{name}"] = [], []
    for start in range(0, images.shape[0], batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        with torch.no_grad():
            out["ref_logits_clean"].append(model(x).float().numpy())
        crafted: dict[str, Any] = {}
        for name, cfg in configs.items():
            crafted[name] = _adversarial(name, cfg, model, x, y, eps, crafted, configs)
        if twin is not None:
            on_twin = transfer_examples(twin, x, y, eps, configs["apgd_ce"], configs["apgd_t"])
            crafted.update({f"{name}{TWIN_SUFFIX}": adv for name, adv in on_twin.items()})
        for name in names:
            with torch.no_grad():
                out[f"ref_logits_{name}"].append(model(crafted[name]).float().numpy())
            out[f"adv_{name}"].append(crafted[name].detach().numpy().astype(np.float32))
    return {key: np.concatenate(chunks) for key, chunks in out.items()}


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean()) if labels.size else 0.0


def _set_metrics(arrays: dict[str, np.ndarray], y: np.ndarray, configs: dict[str, Any], eps: float, norm: str,
                 suite: str) -> dict[str, Any]:
    """The reference's accuracy: clean, per attack (twin-crafted sets included), and the per-example worst
    case over the attacks crafted on the reference itself (its own white-box number)."""
    names = [key[len("ref_logits_"):] for key in arrays if key.startswith("ref_logits_") and key != "ref_logits_clean"]
    correct = {name: arrays[f"ref_logits_{name}"].argmax(axis=1) == y for name in names}
    worst = arrays["ref_logits_clean"].argmax(axis=1) == y
    for name in configs:
        worst &= correct[name]
    per_attack = {name: float(mask.mean()) if y.size else 0.0 for name, mask in correct.items()}
    return {"clean_acc": _accuracy(arrays["ref_logits_clean"], y),
            "robust_acc": float(worst.mean()) if y.size else 0.0,
            "per_attack": per_attack,
            "pgd_robust_acc": per_attack["pgd"], "fgsm_robust_acc": per_attack["fgsm"],
            "attack": {"suite": suite, "white_box_only": True, "eps": eps, "norm": norm,
                       "attacks": [{"name": name, "settings": cfg.to_dict(), "robust_acc": per_attack[name]}
                                   for name, cfg in configs.items()]}}


def _load_twin(quantized: str | Path, ref_manifest: dict[str, Any], eps: float, norm: str) -> tuple[Any, Path, str]:
    """The fake-quant twin of a calibrate directory's INT8 ONNX (checked: same dataset and threat model as
    the reference); returns (twin, the ONNX path, its sha256)."""
    from calibration.fakequant import fake_quant_twin

    manifest = read_manifest(quantized, ("calibrate",))
    onnx_entry = manifest.get("onnx")
    if not isinstance(onnx_entry, dict) or "file" not in onnx_entry or "sha256" not in onnx_entry:
        raise CstarError(f"{quantized} holds no INT8 ONNX model (an ExecuTorch .pte has no fake-quant twin)",
                         "pass the calibrate directory of an ONNX target (ort-cpu, openvino or tensorrt)")
    path = verify_file(quantized, str(onnx_entry["file"]), str(onnx_entry["sha256"]))
    name, ref_name = dataset_name(manifest.get("dataset")), dataset_name(ref_manifest.get("dataset"))
    if name != ref_name:
        raise CstarError(f"--quantized {quantized} was calibrated for dataset '{name}', the reference is '{ref_name}'",
                         "pass the calibrate directory made from this reference's export")
    q_eps = manifest.get("eps")
    if isinstance(q_eps, (int, float)) and abs(float(q_eps) - eps) > 1e-9 or manifest.get("norm", norm) != norm:
        raise CstarError(f"--quantized {quantized} records eps {q_eps} / norm {manifest.get('norm')}, the set is "
                         f"crafted at eps {eps:g} / norm {norm}", "craft the set at the INT8 model's threat model")
    return fake_quant_twin(path), path, str(onnx_entry["sha256"])


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
    suite: str = "aa",
    iters: int | None = None,
    quantized: str | Path | None = None,
) -> dict[str, Any]:
    """Craft the suite's white-box inputs (APGD-CE, APGD-T) and PGD/FGSM on the reference for a
    stratified test subset; write the set and its manifest.

    `quantized` (a calibrate directory with an INT8 ONNX) adds the APGD pair crafted on that model's
    fake-quant twin (calibration.fakequant), so the INT8 build is attacked white-box, not by transfer
    alone. `out` follows cstar.outdir's rule (`force` replaces an existing attackset directory).
    """
    import torch

    from cstar.checkpoint import load_checkpoint
    from cstar.data import load_dataset, to_tensors
    from cstar.outdir import OutputDir, dataset_path

    started = time.perf_counter()
    if eps is not None:
        validate.eps(eps)  # before the model is loaded
    claim = OutputDir(Path(out), "attackset", (reference, dataset_path(data), quantized), force=force)
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
    validate.choice("--suite", suite, SET_SUITES)
    if iters is not None:
        validate.count("--iters", iters)
    validate.count("--batch-size", batch_size)
    input_shape = tuple(ref_manifest["dataset"]["input_shape"])
    bundle = load_dataset(data, image_size=input_shape[-1])
    if tuple(bundle.spec.input_shape) != input_shape:
        raise CstarError(f"--data {data} gives inputs {bundle.spec.input_shape}, the reference expects {input_shape}",
                         "pass the dataset (and path) the reference was trained on")
    indices = _select(bundle.labels("test"), samples, seed)
    images, labels = to_tensors(bundle.test, indices)
    twin = _load_twin(quantized, ref_manifest, eps, norm) if quantized is not None else None
    torch.manual_seed(seed)
    configs = _attack_configs(eps, norm, steps, suite, iters, seed)
    arrays = _craft(model, images, labels, configs, batch_size, eps, twin[0] if twin else None)
    y = labels.numpy().astype(np.int64)
    arrays = {"x_clean": images.numpy().astype(np.float32), "labels": y, "indices": indices.astype(np.int64), **arrays}
    with claim as out_dir:  # staged sibling, renamed into place once set and manifest are written
        _write_set(out_dir, arrays, reference, ref_manifest, eps, norm, input_shape, seed, configs, started, suite,
                   _twin_block(twin, quantized, arrays) if twin else None, [twin[1]] if twin else [])
    return read_manifest(out, ("attackset",))


def _twin_block(twin: tuple[Any, Path, str], quantized: str | Path | None, arrays: dict[str, np.ndarray]
                ) -> dict[str, Any]:
    """set.quantized: which INT8 model the *_fq sets were crafted on, and that model's own white-box numbers."""
    from calibration.fakequant import twin_logits

    model, path, sha = twin
    y = arrays["labels"]
    clean = twin_logits(model, arrays["x_clean"]).argmax(axis=1) == y
    worst = clean.copy()
    for name in TWIN_ATTACKS:
        worst &= twin_logits(model, arrays[f"adv_{name}"]).argmax(axis=1) == y
    return {"calibrate_dir": Path(quantized or path.parent).name, "onnx_sha256": sha, "attacks": list(TWIN_ATTACKS),
            "crafted_on": "fake-quant twin (calibration.fakequant: Q/DQ in PyTorch, straight-through rounding)",
            "twin_clean_acc": float(clean.mean()) if y.size else 0.0,
            "twin_robust_acc": float(worst.mean()) if y.size else 0.0}


def _write_set(out_dir: Path, arrays: dict[str, np.ndarray], reference: str | Path, ref_manifest: dict[str, Any],
               eps: float, norm: str, input_shape: tuple[int, ...], seed: int, configs: dict[str, Any],
               started: float, suite: str, quantized: dict[str, Any] | None = None,
               extra_inputs: list[Path] | None = None) -> None:
    """attackset.npz, then manifest.json (last) into `out_dir`."""
    from cstar.checkpoint import WEIGHTS_NAME

    y = arrays["labels"]
    _save_npz(out_dir / SET_FILE, arrays)
    body: dict[str, Any] = {
        "inputs": [file_entry(Path(reference) / MANIFEST_NAME),
                   file_entry(Path(reference) / ref_manifest.get("weights", {}).get("file", WEIGHTS_NAME)),
                   *(file_entry(path) for path in extra_inputs or [])],
        "dataset": ref_manifest["dataset"],
        "model": ref_manifest["model"],
        "eps": eps,
        "norm": norm,
        "classes": list(ref_manifest["dataset"]["classes"]),
        "input": {"shape": list(input_shape), "dtype": "float32", "range": [0, 1]},
        "set": {"file": SET_FILE, "sha256": sha256_file(out_dir / SET_FILE), "n": int(y.shape[0]),
                "seed": seed, "suite": suite, "attacks": {name: cfg.to_dict() for name, cfg in configs.items()},
                "apgd_t_on": "points APGD-CE left correct on the reference (the others carry APGD-CE's example)"},
        "metrics": _set_metrics(arrays, y, configs, eps, norm, suite),
        "reference_suite": ref_manifest.get("metrics", {}).get("attack", {}).get("suite"),
        "reference_warnings": list(ref_manifest.get("metrics", {}).get("attack", {}).get("warnings", [])),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if quantized is not None:
        body["set"]["quantized"] = quantized
    write_manifest(out_dir, "attackset", body)
