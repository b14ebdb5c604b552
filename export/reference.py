"""The PyTorch reference of an export: the train/compress checkpoint its manifest lists among its inputs.

Both the FP32 ExecuTorch lowering (export.executorch, which lowers that checkpoint rather than the ONNX
file) and calibrate (which quantizes, attacks and compares against it) need to find and load it; this
module is the one place that does, at the lowest layer that needs it. Torch-free at import: torch is
imported only when a checkpoint is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cstar.errors import CstarError
from cstar.manifest import MANIFEST_NAME, read_manifest, sha256_file

if TYPE_CHECKING:
    from cstar.data import DatasetSpec

REFERENCE_STAGES = ("train", "compress")


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


def load_reference(reference_dir: str | Path, spec: DatasetSpec | None = None) -> tuple[Any, dict[str, Any]]:
    """Load the PyTorch reference checkpoint (train/compress dir) and check it was made for `spec`'s data."""
    from cstar.checkpoint import load_checkpoint
    from cstar.data import DatasetSpec

    model, manifest = load_checkpoint(reference_dir)
    if spec is not None:
        ref = DatasetSpec.from_dict(manifest["dataset"])
        if ref.name != spec.name or tuple(ref.input_shape) != tuple(spec.input_shape):
            raise CstarError(
                f"reference {reference_dir} was trained on {ref.name} {list(ref.input_shape)}, "
                f"but the model being calibrated takes {spec.name} {list(spec.input_shape)}",
                "pass --reference with the train/compress directory this model was exported from",
            )
    return model, manifest
