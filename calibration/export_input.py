"""The export directory `cstar calibrate` reads (split out of calibration.calibrate): its manifest's keys,
the FP32 model verified by sha256 and by its input shape, and `--data` matched against the exported dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cstar.errors import CstarError
from cstar.manifest import MANIFEST_NAME, read_manifest, verify_file


@dataclass(frozen=True)
class ExportSource:
    """The export directory calibrated: its manifest, the verified FP32 model, dataset and threat model."""

    from_dir: Path
    export: dict[str, Any]
    fp32_path: Path
    spec: Any  # cstar.data.DatasetSpec
    eps: float
    norm: str


def read_export(from_dir: Path) -> dict[str, Any]:
    """The export manifest of `from_dir`, with the keys calibrate reads."""
    export = read_manifest(from_dir, ("export",))
    for key in ("onnx", "dataset"):
        if key not in export:
            raise CstarError(f"{from_dir}/{MANIFEST_NAME} lacks '{key}'", "re-run cstar export")
    return export


def open_export(from_dir: Path, export: dict[str, Any], data: str) -> ExportSource:
    """Verify the FP32 model (sha256, input shape) and `--data` against the export manifest."""
    from cstar.data import DatasetSpec

    onnx_block = export["onnx"]
    fp32_path = verify_file(from_dir, onnx_block["file"], onnx_block["sha256"])
    spec = check_data(data, DatasetSpec.from_dict(export["dataset"]))
    check_onnx_input(fp32_path, tuple(spec.input_shape), from_dir)
    eps = float(export.get("eps", spec.default_eps))
    return ExportSource(from_dir, export, fp32_path, spec, eps, str(export.get("norm", "linf")))


def check_data(data: str, spec: Any) -> Any:
    """The DatasetSpec to load: the export's, with the --data path when one is given; names must match."""
    from dataclasses import replace

    from cstar.data import parse_dataset_arg

    name, path = parse_dataset_arg(data)
    if name != spec.name:
        raise CstarError(
            f"--data {data} names dataset '{name}', but the model was exported for '{spec.name}'",
            f"pass --data {spec.data_arg}",
        )
    return spec if path is None else replace(spec, path=path)


def check_onnx_input(model_path: Path, shape: tuple[int, ...], from_dir: Path) -> None:
    """Refuse an ONNX model whose input is not (N, *shape), the input its manifest records (before any work)."""
    import onnx

    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - a broken protobuf is one clear message
        raise CstarError(f"{model_path} is not a readable ONNX model ({exc})", "re-run cstar export") from exc
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else []
    fixed = dims[1:]
    if len(inputs) != 1 or len(dims) != len(shape) + 1 or any(
            d is not None and d != want for d, want in zip(fixed, shape, strict=True)):
        got = f"{len(inputs)} inputs" if len(inputs) != 1 else \
            "input (" + ", ".join("N" if d is None else str(d) for d in dims) + ")"
        raise CstarError(f"{model_path} takes {got}, but {from_dir}/{MANIFEST_NAME} records (N, "
                         f"{', '.join(str(d) for d in shape)})", "re-run cstar export (the model and its manifest disagree)")
