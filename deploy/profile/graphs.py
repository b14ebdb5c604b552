"""The ONNX micro-graphs `cstar profile` times, written with `onnx.helper`: one layer's op, a chain of tiny
convs (what one more node costs) and a trivial graph (what one call costs). Torch-free."""

from __future__ import annotations

from typing import Any

import numpy as np

from deploy.profile.specs import OpSpec

OPSET = 17


def onnx_model(nodes: list[Any], inputs: list[Any], initializers: list[Any], out_shape: list[Any]) -> Any:
    import onnx
    from onnx import TensorProto, helper

    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(nodes, "cstar_profile", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cstar-profile")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def op_graph(spec: OpSpec, rng: np.random.Generator) -> Any:
    """The ONNX model of one micro-graph: input x (N, cin, H, W) -> Conv, or Flatten -> Gemm; bias included."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *spec.input_chw])
    bias = numpy_helper.from_array(rng.standard_normal(spec.cout).astype(np.float32) * 0.01, "b")
    if spec.kind == "gemm":
        weight = numpy_helper.from_array((rng.standard_normal((spec.cout, spec.cin)) * 0.01).astype(np.float32), "w")
        nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
                 helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1)]
        return onnx_model(nodes, [x], [weight, bias], ["N", spec.cout])
    shape = (spec.cout, spec.cin, *spec.kernel)
    weight = numpy_helper.from_array((rng.standard_normal(shape) * 0.01).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(spec.kernel), strides=list(spec.stride),
                            pads=list(spec.padding), dilations=list(spec.dilation))
    return onnx_model([node], [x], [weight, bias], ["N", spec.cout, *spec.output_hw])


def chain_graph(nodes: int, channels: int = 8, size: int = 4) -> Any:
    """x (N, c, s, s) -> `nodes` tiny 1x1 Convs in a chain: the slope over `nodes` is what one node costs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])
    weight = numpy_helper.from_array((rng.standard_normal((channels, channels, 1, 1)) * 0.1).astype(np.float32), "w")
    names = ["x", *[f"h{i}" for i in range(1, nodes)], "y"]
    convs = [helper.make_node("Conv", [names[i], "w"], [names[i + 1]]) for i in range(nodes)]
    return onnx_model(convs, [x], [weight], ["N", channels, size, size])



def trivial_graph() -> Any:
    """x (N, 1, 1, 1) -> Relu: what one runtime call costs with (almost) nothing to compute."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, 1])
    return onnx_model([helper.make_node("Relu", ["x"], ["y"])], [x], [], ["N", 1, 1, 1])
