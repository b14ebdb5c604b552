"""The TensorRT network: parsed from ONNX (strongly typed), inspected, and given its batch profile.

A strongly typed network takes its precision from the ONNX tensor types: INT8 from the Q/DQ nodes of
`cstar calibrate`, FP16 from an FP16-converted copy of the FP32 ONNX (onnxconverter-common), which is
why `parse_for_precision` may parse twice. Each function takes the `trt` module as an argument, so
tests check it against a fake module without TensorRT or a GPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cstar.errors import CstarError, MissingDependencyError


@dataclass(frozen=True)
class ProfileShapes:
    """Min/opt/max NCHW shapes of the one input in the optimization profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def has_half_tensors(network: Any, trt: Any) -> bool:
    """Whether any layer of `network` outputs an FP16 tensor (the ONNX already carries FP16)."""
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.DataType.HALF:
                return True
    return False


def has_quantize(network: Any, trt: Any) -> bool:
    """Whether `network` has a quantize layer (explicit Q/DQ quantization, TensorRT's only INT8)."""
    quantize = getattr(trt.LayerType, "QUANTIZE", None)
    return any(network.get_layer(i).type == quantize for i in range(network.num_layers))


def require_fp16_converter() -> None:
    """Raise MissingDependencyError unless onnxconverter-common (FP16 ONNX conversion) is importable."""
    if importlib.util.find_spec("onnxconverter_common") is None or importlib.util.find_spec("onnx") is None:
        raise MissingDependencyError(
            "onnxconverter-common", "tensorrt",
            "FP16 TensorRT engines (a strongly typed network takes FP16 from the ONNX tensor types, "
            "so the FP32 model is converted to FP16 first)",
        )


def fp16_onnx(onnx_path: Path, workdir: Path) -> Path:
    """An FP16 copy of an FP32 ONNX (float32 inputs/outputs kept) via onnxconverter-common."""
    require_fp16_converter()
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    out = workdir / "model.fp16.onnx"
    onnx.save(model, str(out))
    return out


def network_flags(trt: Any, strongly_typed: bool) -> int:
    """create_network() flags: STRONGLY_TYPED when asked and this TensorRT has it."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if strongly_typed and flag is not None else 0


def is_strongly_typed(trt: Any, network: Any) -> bool:
    """Whether `network` IS strongly typed (read back: TensorRT 11 is strongly typed whatever was asked)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:  # TensorRT < 9 had no strongly typed networks
        return False
    return bool(network.get_flag(flag))


def network_from_onnx(
    trt: Any, builder: Any, logger: Any, onnx_path: str | Path, strongly_typed: bool = True
) -> tuple[Any, Any]:
    """(network, parser) for an ONNX file; keep the parser alive as long as the network."""
    onnx_path = Path(onnx_path)
    network = builder.create_network(network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CstarError(
            f"TensorRT could not parse {onnx_path.name}: {errors or 'unknown error'}",
            "run `cstar export`/`cstar calibrate` again, or check trt_check.preflight(onnx) for unsupported ops",
        )
    return network, parser


def parse_for_precision(
    trt: Any, builder: Any, logger: Any, onnx_path: Path, precision: str, strongly_typed: bool, workdir: Path
) -> tuple[Any, Any, bool]:
    """(network, parser, fp16_converted): the network that carries `precision`.

    INT8 needs Q/DQ nodes in the ONNX; FP16 on a strongly typed network without FP16 tensors re-parses
    an FP16 copy written to `workdir`.
    """
    network, parser = network_from_onnx(trt, builder, logger, onnx_path, strongly_typed)
    if precision == "int8" and not has_quantize(network, trt):
        raise CstarError(
            f"{onnx_path.name} has no Q/DQ nodes: TensorRT takes INT8 only from explicit quantization",
            "build from a `cstar calibrate` directory (model.int8.onnx)",
        )
    if precision == "fp16" and is_strongly_typed(trt, network) and not has_half_tensors(network, trt):
        network, parser = network_from_onnx(trt, builder, logger, fp16_onnx(onnx_path, workdir), strongly_typed)
        return network, parser, True
    return network, parser, False


def batch_profile_shapes(network: Any, model_name: str, min_batch: int, opt_batch: int,
                         max_batch: int) -> ProfileShapes:
    """The profile for a batch range over the network's one NCHW input (fixed C, H, W)."""
    if network.num_inputs != 1:
        raise CstarError(f"{model_name} has {network.num_inputs} inputs; expected one NCHW image", "re-export")
    inp = network.get_input(0)
    shape = tuple(int(d) for d in inp.shape)
    if len(shape) != 4 or any(d < 0 for d in shape[1:]):
        raise CstarError(f"input {inp.name} has shape {shape}; expected (N, C, H, W) with fixed C, H, W", "re-export")
    if shape[0] >= 0 and not min_batch == opt_batch == max_batch == shape[0]:
        raise CstarError(
            f"{model_name} has a static batch of {shape[0]}, but the build asks for {min_batch}..{max_batch}",
            f"re-export with a dynamic batch, or pass --min-batch {shape[0]} --opt-batch {shape[0]} "
            f"--max-batch {shape[0]}",
        )
    chw = shape[1:]
    return ProfileShapes(str(inp.name), (min_batch, *chw), (opt_batch, *chw), (max_batch, *chw))


def optimization_profile(builder: Any, shapes: ProfileShapes) -> Any:
    """An IOptimizationProfile holding `shapes`."""
    profile = builder.create_optimization_profile()
    profile.set_shape(shapes.name, shapes.min, shapes.opt, shapes.max)
    return profile
