"""Checkpoints: safetensors weights + manifest.json; architecture rebuilt from names and a layer map.

No pickled modules: a checkpoint is (model registry name + options, dataset spec, a `structure`
map describing every Conv/Linear/BatchNorm/factorized layer, and a flat tensor file). Loading builds
the registry model, swaps in the recorded layers (factorized or pruned shapes), then loads the
weights strictly, after checking their sha256 against the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cstar.data import DatasetSpec
from cstar.errors import CstarError
from cstar.flops import count_flops, count_params
from cstar.lowrank import LowRankConv2d, LowRankLinear
from cstar.manifest import atomic_target, read_manifest, sha256_file, verify_file, write_manifest
from cstar.models import build_model

WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_STAGES = ("train", "compress")


def describe_layer(module: nn.Module) -> dict[str, Any] | None:
    """JSON description of a structural layer, or None for layers without shape-bearing weights."""
    if isinstance(module, LowRankConv2d):
        return {
            "type": "tucker2",
            "in": module.in_channels,
            "out": module.out_channels,
            "kernel": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "dilation": list(module.dilation),
            "bias": module.bias is not None,
            "ranks": list(module.ranks),
        }
    if isinstance(module, LowRankLinear):
        return {"type": "svd", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None,
                "rank": module.rank}
    if isinstance(module, nn.Conv2d):
        return {
            "type": "conv",
            "in": module.in_channels,
            "out": module.out_channels,
            "kernel": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "dilation": list(module.dilation),
            "groups": module.groups,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
    if isinstance(module, nn.BatchNorm2d):
        return {"type": "bn", "features": module.num_features}
    return None


def describe_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{qualified name: layer description} for every structural layer of `model`."""
    structure = {}
    for name, module in model.named_modules():
        description = describe_layer(module)
        if description is not None:
            structure[name] = description
    return structure


def build_layer(description: dict[str, Any], name: str = "?") -> nn.Module:
    """Inverse of `describe_layer` (random weights)."""
    kind = description.get("type")
    if kind == "conv":
        return nn.Conv2d(
            description["in"], description["out"], tuple(description["kernel"]), tuple(description["stride"]),
            description["padding"] if isinstance(description["padding"], str) else tuple(description["padding"]),
            tuple(description["dilation"]), description["groups"], description["bias"],
        )
    if kind == "tucker2":
        return LowRankConv2d(
            description["in"], description["out"], tuple(description["kernel"]), tuple(description["ranks"]),
            tuple(description["stride"]),
            description["padding"] if isinstance(description["padding"], str) else tuple(description["padding"]),
            tuple(description["dilation"]), description["bias"], init=False,
        )
    if kind == "linear":
        return nn.Linear(description["in"], description["out"], description["bias"])
    if kind == "svd":
        return LowRankLinear(description["in"], description["out"], description["rank"], description["bias"],
                             init=False)
    if kind == "bn":
        return nn.BatchNorm2d(description["features"])
    raise CstarError(
        f"unknown layer type {kind!r} for layer '{name}' in the checkpoint",
        "this checkpoint was written by a newer or different tool; valid types: conv, tucker2, linear, svd, bn",
    )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]]) -> nn.Module:
    """Swap in every recorded layer whose description differs from the freshly built one."""
    current = dict(model.named_modules())
    for name, description in structure.items():
        if name not in current:
            raise CstarError(f"layer '{name}' of the checkpoint does not exist in the model", "the checkpoint does not "
                             "match its model name/options; re-run the stage that wrote it")
        if describe_layer(current[name]) != description:
            set_submodule(model, name, build_layer(description, name))
    return model


def model_summary(model: nn.Module, spec: DatasetSpec) -> dict[str, int]:
    """params and flops (MACs at batch 1) counted on the real model."""
    return {"params": count_params(model), "flops": count_flops(model, spec.input_shape)}


def save_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    stage: str,
    model_name: str,
    model_options: dict[str, Any],
    spec: DatasetSpec,
    body: dict[str, Any],
) -> Path:
    """Write weights (atomic) then manifest.json (atomic, last). Returns the manifest path.

    `body` carries the stage-specific keys (inputs, eps, norm, metrics, config, compression, ranks...).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = atomic_target(out / WEIGHTS_NAME)
    try:
        save_file(state, str(tmp))
        tmp.replace(out / WEIGHTS_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    manifest = {
        "dataset": spec.to_dict(),
        "model": {"name": model_name, "options": model_options},
        "structure": describe_structure(model),
        "weights": {"file": WEIGHTS_NAME, "sha256": sha256_file(out / WEIGHTS_NAME)},
        **model_summary(model, spec),
    }
    manifest.update(body)
    return write_manifest(out, stage, manifest)


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a train/compress directory describes and load its verified weights (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest = read_manifest(directory, CHECKPOINT_STAGES)
    for key in ("dataset", "model", "structure", "weights"):
        if key not in manifest:
            raise CstarError(f"{directory}/manifest.json lacks '{key}'", "re-run the stage that wrote it")
    spec = DatasetSpec.from_dict(manifest["dataset"])
    model = build_model(manifest["model"]["name"], spec, **manifest["model"].get("options", {}))
    apply_structure(model, manifest["structure"])
    weights = verify_file(directory, manifest["weights"]["file"], manifest["weights"]["sha256"])
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CstarError(f"{weights} is not a readable safetensors file ({exc})", "re-run the stage") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CstarError(f"weights in {weights} do not fit the recorded architecture: {str(exc)[:300]}",
                         "re-run the stage that wrote the checkpoint") from exc
    return model.to(device).eval(), manifest
