"""Native TensorRT loaders and runner against a fake `trt` module: no tensorrt, no GPU needed.

The fake records what the code asks of TensorRT (network flags, profile shapes, builder flags, timing
cache bytes, tensor addresses) and answers like the documented TensorRT 10 Python API, so each loader
and the multi-output binding are checked here; the real build runs in the `tensorrt`-marked tests.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import deploy.backends.tensorrt.build as trt_build
import deploy.backends.tensorrt.runner as trt_runner
from cstar.errors import CstarError, MissingDependencyError
from deploy.backends.tensorrt import (
    ProfileShapes,
    TensorrtRunner,
    batch_profile_shapes,
    build_config,
    build_engine,
    build_record,
    is_strongly_typed,
    load_timing_cache,
    logits_output,
    network_from_onnx,
    optimization_profile,
    save_engine,
    save_timing_cache,
    serialized_engine,
)

HAS_CONVERTER = importlib.util.find_spec("onnxconverter_common") is not None
FLOAT, HALF = "FLOAT", "HALF"

# ------------------------------------------------------------------------------------ fake builder


class FakeTensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: str = FLOAT) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class FakeLayer:
    def __init__(self, kind: str, out_dtype: str = FLOAT) -> None:
        self.type = kind
        self.num_outputs = 1
        self._out = FakeTensor(f"{kind}_out", (-1,), out_dtype)

    def get_output(self, index: int) -> FakeTensor:
        return self._out


class FakeNetwork:
    """A parsed network; `always_strong` mimics TensorRT 11 (strongly typed whatever the flags say)."""

    def __init__(self, flags: int, always_strong: bool) -> None:
        self.flags = flags
        self.always_strong = always_strong
        self.inputs: list[FakeTensor] = []
        self.outputs: list[FakeTensor] = []
        self.layers: list[FakeLayer] = []

    def get_flag(self, flag: int) -> bool:
        return self.always_strong or bool(self.flags & (1 << flag))

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, i: int) -> FakeTensor:
        return self.inputs[i]

    def get_output(self, i: int) -> FakeTensor:
        return self.outputs[i]

    def get_layer(self, i: int) -> FakeLayer:
        return self.layers[i]


class FakeParser:
    """Fills the network from `trt.models[file name]` (a dict: input shape, outputs, layers)."""

    def __init__(self, network: FakeNetwork, logger: Any, trt: FakeTrt) -> None:
        self.network, self.trt = network, trt
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        self.trt.parsed.append(Path(path).name)
        spec = self.trt.models.get(Path(path).name)
        if spec is None:
            self.num_errors = 1
            return False
        self.network.inputs = [FakeTensor("input", spec["input"])]
        self.network.outputs = [FakeTensor(name, (-1, 10)) for name in spec.get("outputs", ["logits"])]
        self.network.layers = [FakeLayer(kind, dtype) for kind, dtype in spec.get("layers", [("CONV", FLOAT)])]
        return True

    def get_error(self, index: int) -> str:
        return "Unsupported ONNX op: FancyOp"


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[tuple[int, ...]]] = {}

    def set_shape(self, name: str, low: tuple[int, ...], opt: tuple[int, ...], high: tuple[int, ...]) -> None:
        self.shapes[name] = [tuple(low), tuple(opt), tuple(high)]

    def get_shape(self, name: str) -> list[tuple[int, ...]]:
        return self.shapes[name]


class FakeCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"|tuned"  # the build adds timings


class FakeConfig:
    def __init__(self, trt: FakeTrt) -> None:
        self.trt = trt
        self.flags = {trt.BuilderFlag.TF32}  # TensorRT's default: TF32 allowed
        self.pools: dict[int, int] = {}
        self.profiles: list[FakeProfile] = []
        self.cache: FakeCache | None = None

    def set_flag(self, flag: int) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: int) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag: int) -> bool:
        return flag in self.flags

    def set_memory_pool_limit(self, pool: int, size: int) -> None:
        self.pools[pool] = size

    def get_memory_pool_limit(self, pool: int) -> int:
        return self.pools[pool]

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    num_optimization_profiles = property(lambda self: len(self.profiles))

    def create_timing_cache(self, data: bytes) -> FakeCache:
        return FakeCache(bytes(data))

    def set_timing_cache(self, cache: FakeCache, ignore_mismatch: bool) -> bool:
        if cache.data.startswith(b"OTHER-GPU"):
            return False  # what TensorRT answers for a cache from another device / version
        self.cache = cache
        return True

    def get_timing_cache(self) -> FakeCache:
        assert self.cache is not None
        return self.cache


class FakeBuilder:
    def __init__(self, trt: FakeTrt) -> None:
        self.trt = trt

    def create_network(self, flags: int) -> FakeNetwork:
        self.trt.network_flags.append(flags)
        return FakeNetwork(flags, self.trt.always_strong)

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig(self.trt)

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytearray | None:
        self.trt.built.append((network, config))
        return None if self.trt.fail_build else bytearray(b"PLAN:" + network.inputs[0].name.encode())


class FakeTrt(SimpleNamespace):
    """The parts of the `tensorrt` module the backend uses, recording what it is asked."""

    def __init__(self, always_strong: bool = False, models: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.__version__ = "10.99.0"
        self.always_strong = always_strong
        default: dict[str, dict[str, Any]] = {"model.onnx": {"input": (-1, 3, 32, 32)}}
        self.models = models if models is not None else default
        self.parsed: list[str] = []
        self.network_flags: list[int] = []
        self.built: list[tuple[FakeNetwork, FakeConfig]] = []
        self.fail_build = False
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)
        self.BuilderFlag = SimpleNamespace(FP16=0, INT8=1, TF32=5)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE=0)
        self.DataType = SimpleNamespace(FLOAT=FLOAT, HALF=HALF)
        self.LayerType = SimpleNamespace(QUANTIZE="QUANTIZE")
        self.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    def Builder(self, logger: Any) -> FakeBuilder:  # noqa: N802 (TensorRT's name)
        return FakeBuilder(self)

    def OnnxParser(self, network: FakeNetwork, logger: Any) -> FakeParser:  # noqa: N802
        return FakeParser(network, logger, self)


def _parsed(trt: FakeTrt, strongly_typed: bool = True, name: str = "model.onnx") -> tuple[FakeBuilder, FakeNetwork]:
    builder = trt.Builder(None)
    network, _ = network_from_onnx(trt, builder, None, Path(name), strongly_typed)
    return builder, network


# ------------------------------------------------------------------------------------ network


@pytest.mark.parametrize("strongly_typed", [True, False])
def test_network_flag_is_read_back(strongly_typed: bool) -> None:
    trt = FakeTrt()
    _, network = _parsed(trt, strongly_typed)
    assert trt.network_flags == [1 if strongly_typed else 0]  # 1 << STRONGLY_TYPED (0)
    assert is_strongly_typed(trt, network) is strongly_typed
    assert trt.parsed == ["model.onnx"]


def test_tensorrt11_network_is_strongly_typed_whatever_was_asked() -> None:
    trt = FakeTrt(always_strong=True)
    builder, network = _parsed(trt, strongly_typed=False)
    profile = optimization_profile(builder, batch_profile_shapes(network, "m", 1, 1, 1))
    config, _ = build_config(trt, builder, network, "fp16", 64, profile)
    record = build_record(trt, network, config, profile, "fp16")
    assert record["strongly_typed"] is True  # read back, not copied from the request
    assert record["builder_flags"]["fp16"] is False  # no precision flags on a strongly typed network


def test_parse_error_names_the_parser_errors() -> None:
    trt = FakeTrt(models={})
    with pytest.raises(CstarError, match="FancyOp"):
        _parsed(trt)


# ------------------------------------------------------------------------------------ profile


def test_profile_shapes_for_a_batch_range() -> None:
    trt = FakeTrt()
    builder, network = _parsed(trt)
    shapes = batch_profile_shapes(network, "model.onnx", 2, 8, 32)
    assert shapes == ProfileShapes("input", (2, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))
    profile = optimization_profile(builder, shapes)
    assert profile.get_shape("input") == [(2, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32)]


def test_static_batch_must_match_the_range() -> None:
    trt = FakeTrt(models={"model.onnx": {"input": (4, 3, 32, 32)}})
    _, network = _parsed(trt)
    with pytest.raises(CstarError, match="static batch of 4") as info:
        batch_profile_shapes(network, "model.onnx", 1, 8, 64)
    assert "--min-batch 4 --opt-batch 4 --max-batch 4" in (info.value.hint or "")
    assert batch_profile_shapes(network, "model.onnx", 4, 4, 4).max == (4, 3, 32, 32)


def test_dynamic_spatial_dims_are_refused() -> None:
    trt = FakeTrt(models={"model.onnx": {"input": (-1, 3, -1, -1)}})
    _, network = _parsed(trt)
    with pytest.raises(CstarError, match="fixed C, H, W"):
        batch_profile_shapes(network, "model.onnx", 1, 1, 8)


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("strongly_typed", "precision", "fp16", "int8", "tf32"),
    [
        (True, "fp32", False, False, False),  # FP32 clears TF32
        (True, "fp16", False, False, True),  # strongly typed: precision comes from the ONNX types
        (True, "int8", False, False, True),
        (False, "fp16", True, False, True),  # weakly typed (TensorRT 10): builder flags
        (False, "int8", False, True, True),
    ],
)
def test_precision_flags(strongly_typed: bool, precision: str, fp16: bool, int8: bool, tf32: bool) -> None:
    trt = FakeTrt()
    builder, network = _parsed(trt, strongly_typed)
    profile = optimization_profile(builder, batch_profile_shapes(network, "m", 1, 4, 16))
    config, cache = build_config(trt, builder, network, precision, 256, profile)
    assert cache is None and config.cache is not None  # an in-memory cache even without a file
    record = build_record(trt, network, config, profile, precision)
    assert record["builder_flags"] == {"fp16": fp16, "int8": int8, "tf32": tf32}
    assert record["tf32"] is tf32
    assert record["strongly_typed"] is strongly_typed
    assert record["workspace_mb"] == 256 and config.get_memory_pool_limit(0) == 256 << 20
    assert record["batch"] == {"min": 1, "opt": 4, "max": 16}
    assert record["input"] == {"name": "input", "shape": [3, 32, 32]}
    assert record["optimization_profiles"] == 1


def test_bad_precision_is_refused() -> None:
    trt = FakeTrt()
    builder, network = _parsed(trt)
    with pytest.raises(CstarError, match="not valid"):
        build_config(trt, builder, network, "bf16", 64, FakeProfile())


# ------------------------------------------------------------------------------------ timing cache


def test_timing_cache_is_loaded_and_saved_back(tmp_path: Path) -> None:
    trt = FakeTrt()
    builder, network = _parsed(trt)
    path = tmp_path / "caches" / "trt.timing"
    path.parent.mkdir()
    path.write_bytes(b"CACHE-v1")
    profile = optimization_profile(builder, batch_profile_shapes(network, "m", 1, 1, 8))
    config, use = build_config(trt, builder, network, "fp32", 64, profile, path)
    assert use is not None and use.loaded_bytes == 8 and not use.discarded
    assert config.get_timing_cache().data == b"CACHE-v1"  # the file's bytes went into the config
    saved = save_timing_cache(config, use)
    assert path.read_bytes() == b"CACHE-v1|tuned" and saved.saved_bytes == 14
    assert not list(path.parent.glob(".*.tmp"))
    record = build_record(trt, network, config, profile, "fp32", saved)
    assert record["timing_cache"] == {"path": str(path), "loaded_bytes": 8, "saved_bytes": 14, "discarded": False}


def test_missing_timing_cache_file_starts_empty(tmp_path: Path) -> None:
    trt = FakeTrt()
    config = FakeConfig(trt)
    use = load_timing_cache(trt, config, tmp_path / "new.timing")
    assert use is not None and use.loaded_bytes == 0 and config.get_timing_cache().data == b""
    save_timing_cache(config, use)
    assert (tmp_path / "new.timing").read_bytes() == b"|tuned"


def test_timing_cache_from_another_gpu_is_dropped_with_a_warning(tmp_path: Path) -> None:
    trt = FakeTrt()
    config = FakeConfig(trt)
    path = tmp_path / "old.timing"
    path.write_bytes(b"OTHER-GPU-cache")
    with pytest.warns(UserWarning, match="another TensorRT version or GPU"):
        use = load_timing_cache(trt, config, path)
    assert use is not None and use.discarded and use.loaded_bytes == 0
    assert config.get_timing_cache().data == b""


# ------------------------------------------------------------------------------------ engine


def test_serialized_engine_and_atomic_save(tmp_path: Path) -> None:
    trt = FakeTrt()
    builder, network = _parsed(trt)
    data = serialized_engine(builder, network, FakeConfig(trt))
    assert data == b"PLAN:input" and isinstance(data, bytes)
    target = save_engine(data, tmp_path / "out" / "model.engine")
    assert target.read_bytes() == b"PLAN:input"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.engine"]
    trt.fail_build = True
    with pytest.raises(CstarError, match="failed to build"):
        serialized_engine(builder, network, FakeConfig(trt), "model.onnx")


@pytest.fixture()
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> FakeTrt:
    trt = FakeTrt()
    monkeypatch.setattr(trt_build, "import_trt", lambda: trt)
    monkeypatch.setattr(trt_build, "gpu_info", lambda device=0: {"name": "Fake GPU", "compute_capability": "9.0"})
    return trt


def _onnx(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx")  # the fake parser reads the spec by file name
    return path


def test_build_engine_composes_the_loaders(fake_trt: FakeTrt, tmp_path: Path) -> None:
    cache = tmp_path / "trt.timing"
    info = build_engine(_onnx(tmp_path), tmp_path / "b" / "model.engine", 2, 4, 16, "fp32",
                        timing_cache_path=cache, workspace_mb=128)
    assert (tmp_path / "b" / "model.engine").read_bytes() == b"PLAN:input"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["model.engine"]  # no temp dir left
    assert cache.read_bytes() == b"|tuned"
    assert info["batch"] == {"min": 2, "opt": 4, "max": 16} and info["workspace_mb"] == 128
    assert info["strongly_typed"] is True and info["tf32"] is False and info["fp16_converted"] is False
    assert info["timing_cache"]["saved_bytes"] == 6
    assert info["compute_capability"] == "9.0" and info["tensorrt_version"] == "10.99.0"
    assert info["outputs"] == ["logits"] and info["logits_output"] == "logits"


def test_build_engine_failure_leaves_no_engine(fake_trt: FakeTrt, tmp_path: Path) -> None:
    fake_trt.fail_build = True
    with pytest.raises(CstarError, match="failed to build"):
        build_engine(_onnx(tmp_path), tmp_path / "b" / "model.engine", 1, 1, 4)
    assert list((tmp_path / "b").iterdir()) == []


def test_int8_needs_quantize_layers(fake_trt: FakeTrt, tmp_path: Path) -> None:
    with pytest.raises(CstarError, match="no Q/DQ"):
        build_engine(_onnx(tmp_path), tmp_path / "model.engine", 1, 1, 4, "int8")
    fake_trt.models["model.onnx"]["layers"] = [("QUANTIZE", FLOAT), ("CONV", FLOAT)]
    info = build_engine(_onnx(tmp_path), tmp_path / "model.engine", 1, 1, 4, "int8")
    assert info["network"]["quantize_layers"] is True and info["builder_flags"]["int8"] is False


def test_fp16_without_converter_names_the_extra(fake_trt: FakeTrt, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)  # as if not installed (find_spec -> None)
    with pytest.raises(MissingDependencyError) as info:
        build_engine(_onnx(tmp_path), tmp_path / "model.engine", 1, 1, 4, "fp16")
    assert info.value.package == "onnxconverter-common" and info.value.extra == "tensorrt"
    assert "cstar[tensorrt]" in (info.value.hint or "")
    assert not (tmp_path / "model.engine").exists()


def test_fp16_needs_no_conversion_when_not_required(fake_trt: FakeTrt, tmp_path: Path) -> None:
    """An ONNX that already has FP16 tensors, or a weakly typed build, takes FP16 without onnxconverter-common."""
    fake_trt.models["model.onnx"]["layers"] = [("CONV", HALF)]
    info = build_engine(_onnx(tmp_path), tmp_path / "a.engine", 1, 1, 4, "fp16")
    assert info["fp16_converted"] is False and info["network"]["half_tensors"] is True
    fake_trt.models["model.onnx"]["layers"] = [("CONV", FLOAT)]
    info = build_engine(_onnx(tmp_path), tmp_path / "b.engine", 1, 1, 4, "fp16", strongly_typed=False)
    assert info["strongly_typed"] is False and info["builder_flags"]["fp16"] is True
    assert fake_trt.parsed == ["model.onnx", "model.onnx"]


@pytest.mark.skipif(not HAS_CONVERTER, reason="needs onnxconverter-common")
def test_fp16_converts_and_reparses(fake_trt: FakeTrt, tmp_path: Path) -> None:
    from tests.deploy.test_backends import make_tiny_onnx

    make_tiny_onnx(tmp_path / "model.onnx")
    fake_trt.models["model.fp16.onnx"] = {"input": (-1, 1, 8, 8), "layers": [("CONV", HALF)]}
    info = build_engine(tmp_path / "model.onnx", tmp_path / "model.engine", 1, 1, 4, "fp16")
    assert fake_trt.parsed == ["model.onnx", "model.fp16.onnx"]
    assert info["fp16_converted"] is True and info["network"]["half_tensors"] is True


# ------------------------------------------------------------------------------------ runner


def test_logits_output_follows_the_export_contract() -> None:
    assert logits_output(["features", "logits"], "m") == "logits"
    assert logits_output(["out0"], "m") == "out0"
    with pytest.raises(CstarError, match="none is named 'logits'"):
        logits_output(["a", "b"], "m")


class FakeMemory:
    """Host-side stand-in for device buffers: pointers index bytearrays."""

    library = "fake"
    stream_handle = 7

    def __init__(self) -> None:
        self.buffers: dict[int, bytearray] = {}

    def alloc(self, nbytes: int) -> int:
        ptr = 4096 * (len(self.buffers) + 1)
        self.buffers[ptr] = bytearray(max(int(nbytes), 1))
        return ptr

    def htod(self, dst: int, host: np.ndarray) -> None:
        self.buffers[dst][: host.nbytes] = host.tobytes()

    def dtoh(self, host: np.ndarray, src: int) -> None:
        host.reshape(-1).view(np.uint8)[:] = np.frombuffer(self.buffers[src], np.uint8, host.nbytes)

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self.buffers.clear()


class FakeContext:
    """features = per-channel means (N, 3); logits = 10 * per-image sums (N, 2)."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.batch = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        self.batch = shape[0]
        return bool(low[0] <= shape[0] <= high[0])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.batch, *self.engine.tensors[name][1][1:])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        memory = self.engine.memory
        n = self.batch
        x = np.frombuffer(memory.buffers[self.addresses["input"]], np.float32, n * 3 * 4 * 4).reshape(n, 3, 4, 4)
        results = {"features": x.mean(axis=(2, 3)), "logits": np.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], 1) * 10}
        for name in self.engine.outputs:
            memory.htod(self.addresses[name], results.get(name, results["logits"]).astype(np.float32))
        return True


class FakeEngine:
    def __init__(self, outputs: list[str], memory: FakeMemory) -> None:
        self.outputs, self.memory = outputs, memory
        widths = {"features": 3, "logits": 2}
        self.tensors: dict[str, tuple[str, tuple[int, ...]]] = {"input": ("INPUT", (-1, 3, 4, 4))}
        self.tensors.update({name: ("OUTPUT", (-1, widths.get(name, 2))) for name in outputs})
        self.contexts: list[FakeContext] = []

    num_io_tensors = property(lambda self: len(self.tensors))

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_mode(self, name: str) -> str:
        return self.tensors[name][0]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
        return (1, 3, 4, 4), (4, 3, 4, 4), (8, 3, 4, 4)

    def get_tensor_dtype(self, name: str) -> str:
        return FLOAT

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def _runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outputs: list[str]) -> tuple[TensorrtRunner, FakeEngine]:
    memory = FakeMemory()
    engine = FakeEngine(outputs, memory)
    trt = FakeTrt()
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    trt.nptype = lambda dtype: np.float32
    monkeypatch.setattr(trt_runner, "import_trt", lambda: trt)
    monkeypatch.setattr(trt_runner, "device_memory", lambda: memory)
    path = tmp_path / "model.engine"
    path.write_bytes(b"PLAN")
    return TensorrtRunner(path), engine


def test_runner_binds_every_output_and_returns_logits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner, engine = _runner(tmp_path, monkeypatch, ["features", "logits"])  # logits is NOT output 0
    x = np.random.default_rng(0).random((5, 3, 4, 4), dtype=np.float32)
    with runner:
        addresses = engine.contexts[0].addresses
        assert set(addresses) == {"input", "features", "logits"}
        assert len(set(addresses.values())) == 3  # each tensor its own buffer
        assert runner.batch_range() == (1, 8)
        out = runner.infer(x)
        np.testing.assert_allclose(out[:, 0], 10 * x.sum((1, 2, 3)), rtol=1e-5)
        np.testing.assert_allclose(out[:, 1], -10 * x.sum((1, 2, 3)), rtol=1e-5)
        np.testing.assert_allclose(runner.last_outputs["features"], x.mean(axis=(2, 3)), rtol=1e-5)
        assert runner.describe()["logits_output"] == "logits"
    assert not runner.last_outputs and not engine.memory.buffers  # freed on deactivate


def test_runner_single_output_with_another_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner, _ = _runner(tmp_path, monkeypatch, ["output"])
    x = np.ones((2, 3, 4, 4), dtype=np.float32)
    with runner:
        np.testing.assert_allclose(runner.infer(x), [[480.0, -480.0]] * 2)


def test_runner_refuses_ambiguous_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner, engine = _runner(tmp_path, monkeypatch, ["features", "scores"])
    with pytest.raises(CstarError, match="none is named 'logits'"):
        runner.activate()
    assert not runner.is_active and not engine.memory.buffers
