"""`cstar import`: a train-stage directory from weights made elsewhere, so `cstar compress` starts
from the user's own robust model.

Reads `.safetensors`, or `.pt`/`.pth` with `torch.load(weights_only=True)` (tensors and plain
containers only: no pickled objects). Common layouts are mapped onto the registry model
(`normalize` + `net`): a `state_dict` / `model` / `model_state_dict` / `net` wrapper, DataParallel's
`module.` prefix, a body saved without the `net.` prefix, and a missing normalization layer, filled
from `--mean/--std` (the statistics the model was trained with) or the dataset's. The stage measures
clean and attack-suite robust accuracy on the data (like `cstar train`) and records where the weights
came from (file, sha256, the mapping applied) in the manifest.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from cstar import validate
from cstar.errors import CstarError
from cstar.stage_metrics import (
    add_eval_arguments,
    metrics_summary,
    spec_from_args,
    stage_metrics,
    test_tensors,
)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar import`."""
    parser.add_argument("--model", required=True, help="model registry name or import path package.module:factory the weights fit (e.g. preact-resnet18, torchvision.models:mobilenet_v2)")
    parser.add_argument("--model-options", default=None, metavar="JSON",
                        help="keyword arguments of the model builder as a JSON object (recorded in the manifest)")
    parser.add_argument("--width", type=int, default=None, help="base width of small-resnet/resnet18 models")
    parser.add_argument("--weights", required=True, type=Path, help=".safetensors, or .pt/.pth (weights_only)")
    parser.add_argument("--data", required=True, help="dataset to evaluate on (name or name:path)")
    parser.add_argument("--eps", type=float, default=None, help="threat model's Linf radius (default: dataset's)")
    parser.add_argument("--mean", type=float, nargs="+", default=None,
                        help="per-channel input mean the model was trained with, when its weights hold no "
                             "normalization layer (default: the dataset's)")
    parser.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std (with --mean)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation subset and attacks")
    parser.add_argument("--out", required=True, type=Path, help="output directory (a train-stage directory)")
    parser.add_argument("--force", action="store_true", help="replace an existing train directory at --out")
    add_eval_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """CLI entry: import, evaluate, print a one-line summary."""
    from cstar.models import model_options

    manifest = run_import(args.model, args.weights, args.data, args.out, width=args.width,
                          options=model_options(None, args.model_options), eps=args.eps,
                          mean=args.mean, std=args.std, seed=args.seed, force=args.force, eval_args=args)
    print(f"imported {manifest['model']['name']} from {Path(args.weights).name} "
          f"({', '.join(manifest['imported']['mapping']) or 'keys as saved'}): "
          f"{metrics_summary(manifest['metrics'])}, {manifest['params']} params -> {args.out}")
    return 0


def read_weights(path: Path) -> dict[str, Any]:
    """The tensors of a weights file (safetensors, or a torch file loaded with weights_only=True)."""
    import torch

    if path.suffix not in WEIGHT_SUFFIXES:
        raise CstarError(f"{path}: unknown weights format '{path.suffix}'",
                         f"pass a {', '.join(WEIGHT_SUFFIXES)} file (a state dict)")
    if not path.is_file():
        raise CstarError(f"weights file {path} does not exist", "pass the path of the .safetensors/.pt file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CstarError(f"{path} is not a readable safetensors file ({exc})", "pass an intact file") from exc
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refused or corrupt: one clear error
        raise CstarError(f"{path} could not be read with torch.load(weights_only=True): {str(exc).splitlines()[0]}",
                         "save a plain state dict (torch.save(model.state_dict(), f)) or a .safetensors file") from exc
    if not isinstance(loaded, dict):
        raise CstarError(f"{path} holds a {type(loaded).__name__}, not a state dict",
                         "save model.state_dict() (not the model object)")
    return loaded


def _unwrap(state: dict[str, Any], mapping: list[str]) -> dict[str, Any]:
    """The tensor dict inside a training checkpoint's wrapper ({'state_dict': ...}, {'model': ...})."""
    import torch

    for _ in range(3):
        if all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
        inner = next((k for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        mapping.append(f"unwrapped '{inner}'")
        state = state[inner]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CstarError("the weights file holds no tensors", "save model.state_dict()")
    if len(tensors) != len(state):
        mapping.append(f"ignored {len(state) - len(tensors)} non-tensor entries")
    return tensors


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def map_state(state: dict[str, Any], model: Any, mean: list[float] | None, std: list[float] | None
              ) -> tuple[dict[str, Any], list[str]]:
    """Rename a foreign state dict onto `model`'s keys (normalize.*, net.*); returns (state, what was done)."""
    import torch

    mapping: list[str] = []
    state = _unwrap(state, mapping)
    for prefix in ("module.", "_orig_mod."):  # DataParallel / DDP, torch.compile
        if state and all(k.startswith(prefix) for k in state):
            state = _strip_prefix(state, prefix)
            mapping.append(f"stripped '{prefix}'")
    expected = model.state_dict()
    if not any(k.startswith("net.") for k in state) and any(f"net.{k}" in expected for k in state):
        state = {(k if k.startswith("normalize.") else f"net.{k}"): v for k, v in state.items()}
        mapping.append("added 'net.'")
    if "normalize.mean" not in state and "normalize.mean" in expected:
        channels = int(expected["normalize.mean"].numel())
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != channels:
                raise CstarError(f"--{name} has {len(values)} values, the model takes {channels} channels",
                                 f"pass {channels} values")
            tensor = expected[f"normalize.{name}"] if values is None else \
                torch.tensor(values, dtype=torch.float32).view_as(expected[f"normalize.{name}"])
            state[f"normalize.{name}"] = tensor
        mapping.append("normalization from --mean/--std" if mean is not None else "normalization: the dataset's")
    return state, mapping


def _load_into(model: Any, state: dict[str, Any], weights: Path, model_name: str) -> None:
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        shown = ", ".join([*(f"missing {k}" for k in missing[:3]), *(f"unexpected {k}" for k in unexpected[:3])])
        raise CstarError(f"{weights} does not fit {model_name}: {len(missing)} keys missing, {len(unexpected)} "
                         f"unexpected ({shown})",
                         "pass the --model (and --width) the weights were trained as, or save the model's "
                         "state_dict() with its own key names")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CstarError(f"{weights} does not fit {model_name}: {str(exc).splitlines()[-1].strip()[:300]}",
                         "pass the --model and --width the weights were trained as") from exc


def run_import(model_name: str, weights: str | Path, data: str, out: str | Path, width: int | None = None,
               options: dict[str, Any] | None = None, eps: float | None = None, mean: list[float] | None = None, std: list[float] | None = None,
               seed: int = 0, force: bool = False, eval_args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Import `weights` as model `model_name` (a registry name or package.module:factory, built with `options`
    and `width`), evaluate on `data`, write a train-stage directory."""
    from cstar.checkpoint import save_checkpoint
    from cstar.data import load_dataset
    from cstar.manifest import file_entry, read_manifest
    from cstar.models import build_model
    from cstar.outdir import OutputDir, dataset_path

    started = time.perf_counter()
    weights = Path(weights)
    if eps is not None:
        validate.eps(eps)
    if (mean is None) != (std is None):
        raise CstarError("--mean and --std go together", "pass both (the model's training normalization) or neither")
    if std is not None and any(not s > 0 for s in std):
        raise CstarError(f"--std must be positive, got {std}", "pass the per-channel standard deviations")
    claim = OutputDir(Path(out), "train", (weights, dataset_path(data)), force=force)
    state = read_weights(weights)
    bundle = load_dataset(data)
    spec = bundle.spec
    eps = spec.default_eps if eps is None else eps
    validate.eps(eps, "--eps", spec.name)
    options = {**(options or {}), **({"width": width} if width else {})}
    model = build_model(model_name, spec, **options)
    mapped, mapping = map_state(state, model, mean, std)
    _load_into(model, mapped, weights, model_name)
    model.eval()
    eval_spec = spec_from_args(eval_args or argparse.Namespace(), seed=seed)
    test_x, test_y = test_tensors(bundle, getattr(eval_args, "eval_limit", None), seed)
    metrics = stage_metrics(model, test_x, test_y, eps, "linf", eval_spec)
    with claim as out_dir:
        save_checkpoint(out_dir, model, "train", model_name, options, spec, {
            "inputs": [file_entry(weights), {"path": spec.data_arg, "sha256": None}],
            "eps": eps, "norm": "linf", "metrics": metrics,
            "config": {"imported": True, "data": data, "model": model_name, "eps": eps, "norm": "linf", "seed": seed},
            "imported": {"file": weights.name, "mapping": mapping,
                         "normalization": "from the weights" if not any("normalization" in m for m in mapping)
                         else ("--mean/--std" if mean is not None else "the dataset's")},
            "seconds": round(time.perf_counter() - started, 3),
        })
    if mean is None and any("normalization: the dataset's" in m for m in mapping):
        print("note: the weights hold no normalization layer; the dataset's mean/std were used (pass --mean/--std "
              "if the model was trained with others)", file=sys.stderr)
    return read_manifest(out, ("train",))
