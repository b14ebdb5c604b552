"""`benchmarks/run_all.py --quick` end to end (numbers that a broken pipeline misses, provenance, refused reuse),
and the one reuse check of the benchmarks: stale stage directories, verify reports and caches."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("compression_table", "deploy_speed", "training_overhead", "export_robustness", "cross_runtime")


def _accuracies(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, value) whose key ends in '_acc', anywhere in a JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("_acc"):
                yield f"{path}.{key}", item
            yield from _accuracies(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _accuracies(item, f"{path}[{index}]")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)


def _load(results: Path, name: str) -> dict[str, Any]:
    payload = json.loads((results / f"{name}_digits.json").read_text())
    assert (results / f"{name}_digits.md").read_text().strip()
    return payload


QUICK_RATIO = 8.0
DENSE_EPOCHS = 3  # 1 epoch of PGD-AT leaves digits near chance (~0.2 clean); 3 reach ~0.6 on this CPU


@pytest.mark.slow
def test_run_all_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_all --quick end to end: provenance in every file, budgets met, a dense model that learned,
    exports equal to PyTorch, cross_runtime on ort-cpu and its skip path; then a changed config and a deleted
    input are refused, not reused."""
    results, work = tmp_path / "results", tmp_path / "work"
    common = ["--quick", "--work", str(work), "--results-dir", str(results), "--dense-epochs", str(DENSE_EPOCHS)]
    # cross_runtime on ort-cpu plus a runtime this host lacks (its skip path), on the shared dense model
    done = _run(str(REPO / "benchmarks" / "run_all.py"), *common,
                "--extra", "cross_runtime:--backends ort-cpu,openvino-npu --all-threads 2")
    assert done.returncode == 0, done.stderr[-4000:]
    for name in BENCHMARKS:
        payload = _load(results, name)
        assert payload["quick"] is True and payload["rows"]
        assert f"benchmarks/{name}.py" in payload["command"] and "--quick" in payload["command"]
        assert payload["machine"]["cpu_model"] and payload["versions"]["torch"] and "dirty" in payload["git"]
        for where, value in _accuracies(payload):
            assert value is None or 0.0 <= value <= 1.0, f"{name}{where} = {value!r}"
    _check_table(_load(results, "compression_table"))
    _check_speed(_load(results, "deploy_speed"))
    _check_exports(_load(results, "export_robustness"))
    _check_cross_runtime(results, monkeypatch)
    overhead = _load(results, "training_overhead")
    assert all(row["epoch_seconds"] > 0 and row["images_per_s"] > 0 for row in overhead["rows"])
    assert overhead["rows"][0]["phase"] == "dense_pgd_at" and overhead["rows"][0]["vs_dense"] == 1.0
    run_all = json.loads((results / "run_all_digits.json").read_text())
    assert [r["script"] for r in run_all["runs"]] == list(BENCHMARKS)
    assert all(r["exit_code"] == 0 and r["seconds"] > 0 for r in run_all["runs"])
    _check_refusals(work, common)


def _check_table(table: dict[str, Any]) -> None:
    rows = {row["model"]: row for row in table["rows"]}
    assert set(rows) == {"dense", "cstar-x8", "prune-x8", "lowrank-uniform-x8"}
    assert rows["dense"]["clean_acc"] >= 0.4, "the dense model did not learn (chance is 0.1)"
    for key in ("cstar-x8", "prune-x8", "lowrank-uniform-x8"):
        row = rows[key]
        assert QUICK_RATIO * 0.99 <= row["params_ratio"] <= QUICK_RATIO * 1.25, (key, row["params_ratio"])
        assert row["flops_ratio"] > 1.5 and row["params"] * QUICK_RATIO <= rows["dense"]["params"] * 1.01
        assert row["square"]["queries"] == table["config"]["square_queries"]


def _check_speed(speed: dict[str, Any]) -> None:
    models = {row["model"] for row in speed["rows"]}
    assert models == {"dense", "cstar-x8", "prune-x8", "cstar-x8-step8"}
    assert {row["precision"] for row in speed["rows"]} == {"fp32", "int8"}
    for row in speed["rows"]:
        for cell in row["batch"].values():
            assert cell["p50_ms"] > 0
            if row["model"] == "dense":
                assert cell["speedup"] == 1.0
    stepped = next(row for row in speed["rows"] if row["model"] == "cstar-x8-step8")
    assert stepped["rank_step"] == 8 and stepped["params_ratio"] >= QUICK_RATIO * 0.99
    assert speed["rank_step"]["available"] and "--rank-step" in speed["rank_step"]["how"]


def _check_exports(robustness: dict[str, Any]) -> None:
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for row in robustness["rows"]:
        by_model.setdefault(row["model"], {})[row["tier"]] = row
    assert set(by_model) == {"dense", "cstar-x8", "prune-x8", "lowrank-uniform-x8"}
    for model, tiers in by_model.items():
        torch_row, fp32 = tiers["pytorch"], tiers["onnx-fp32"]
        assert fp32["agreement"] >= 0.98 and abs(fp32["clean_acc"] - torch_row["clean_acc"]) <= 0.02, model
        assert fp32["verify_passed"] is True, (model, fp32["failed_checks"])
    assert by_model["dense"]["pytorch"]["clean_acc"] >= 0.4


def _check_refusals(work: Path, common: list[str]) -> None:
    """A finished compress run is not reused for another config; a stage whose input was deleted is refused."""
    other = _run(str(REPO / "benchmarks" / "compression_table.py"), *common, "--by", "flops")
    assert other.returncode == 2, other.stderr[-2000:]
    assert f"{work / 'compress' / 'cstar-x8-e1+0'}" in other.stderr
    assert "config.by='params' there, 'flops' wanted" in other.stderr
    weights = json.loads((work / "compress" / "prune-x8-e1+0" / "manifest.json").read_text())["weights"]["file"]
    (work / "compress" / "prune-x8-e1+0" / weights).unlink()
    gone = _run(str(REPO / "benchmarks" / "export_robustness.py"), *common)
    assert gone.returncode == 2, gone.stderr[-2000:]
    assert "was deleted" in gone.stderr and "prune-x8-e1+0" in gone.stderr and "fix: delete " in gone.stderr


def _check_cross_runtime(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cross_runtime --quick on ort-cpu plus a runtime this host lacks: every (model, runtime, precision)
    verified and timed, the INT8 check, fastest and headline recomputed from the rows; a skip has its reason."""
    payload, markdown = _load(results, "cross_runtime"), (results / "cross_runtime_digits.md").read_text()
    ran = [name for name, entry in payload["backends"].items() if entry["available"]]
    assert ran[0] == "ort-cpu"
    for name, entry in payload["backends"].items():  # openvino-npu: skipped unless this host has an NPU
        assert entry["available"] or (entry["reason"] and f"{name} ({entry['reason']})" in markdown)
    for where, value in _accuracies(payload):
        assert value is None or 0.0 <= value <= 1.0, f"{where} = {value!r}"
    rows = {(r["model"], r["backend"], r["precision"]): r for r in payload["rows"]}
    assert set(rows) == {(m, b, p) for m in ("dense", "cstar-x8", "prune-x8") for b in ran for p in ("fp32", "int8")}
    for (model, backend, precision), row in rows.items():
        for setting in ("1t", "all"):
            for size in ("1", "64"):
                assert row["p50_ms"][setting][size] > 0
                dense = rows[("dense", backend, precision)]["p50_ms"][setting][size]
                assert row["speedup_vs_dense"][setting][size] == pytest.approx(dense / row["p50_ms"][setting][size])
        fp32 = rows[(model, backend, "fp32")]
        drop = fp32["clean_acc"] - row["clean_acc"]
        wanted = abs(drop) <= 0.01 + 1e-9 and row["agreement"] >= 0.98
        assert row["int8_ok"] is (wanted if precision == "int8" else None), (model, backend, precision)
    cifar = payload["cifar"]
    assert cifar["random_weights"] is True and "random weights" in markdown.lower()
    assert all(cifar["models"][k]["flops_ratio"] >= 8.0 * 0.99 for k in ("cstar-x8flops", "prune-x8flops"))
    for size in ("1", "8"):
        assert all(r["p50_ms"][size] > 0 for r in cifar["rows"])
        dense = min((r for r in cifar["rows"] if r["model"] == "dense"), key=lambda r: r["p50_ms"][size])
        best = min((r for r in cifar["rows"] if r["model"] != "dense"), key=lambda r: r["p50_ms"][size])
        head = cifar["headline"][size]
        assert head["speedup"] == pytest.approx(dense["p50_ms"][size] / best["p50_ms"][size], rel=1e-12)
        assert (head["compressed"]["model"], head["compressed"]["backend"]) == (best["model"], best["backend"])
        assert cifar["fastest"]["dense"][size]["p50_ms"] == head["dense"]["p50_ms"] == dense["p50_ms"][size]
        assert f"**{head['speedup']:.2f}x**" in markdown
        ort = {r["precision"]: r["p50_ms"][size] for r in cifar["rows"]
               if r["model"] == "dense" and r["backend"] == "ort-cpu"}
        assert cifar["ort_int8_vs_fp32"][size] == pytest.approx(ort["fp32"] / ort["int8"])
    assert isinstance(cifar["cpu"]["avx512_vnni"], bool) and "vnni" in markdown

    sys.path.insert(0, str(REPO))  # the skip path, whatever this host has installed
    from benchmarks import cross_runtime
    from deploy.backends import registry

    monkeypatch.setattr(registry, "backend_available", lambda name: (name == "ort-cpu", f"{name}: not here"))
    plan = cross_runtime.backend_plan(["ort-cpu", "executorch-xnnpack"])
    assert plan["executorch-xnnpack"] == {"available": False, "reason": "executorch-xnnpack: not here"}
    assert cross_runtime.skipped_line(plan) == (
        "Skipped (not runnable here): executorch-xnnpack (executorch-xnnpack: not here).\n\n")


def test_cifar10_gpu_plan_fits_the_budget() -> None:
    """The planned epochs, at the planned cost per epoch, stay inside the budget's training shares."""
    import argparse

    sys.path.insert(0, str(REPO))
    from benchmarks import cifar10_gpu

    args = argparse.Namespace(budget_seconds=360.0, dense_epochs=None, compress_epochs=None)
    plan = cifar10_gpu.plan_epochs({"epoch_seconds": 5.9}, args, n_methods=3, n_ratios=1)
    epoch = plan["estimated_epoch_seconds"]
    assert plan["dense_epochs"] * epoch <= cifar10_gpu.DENSE_SHARE * 360 + 1e-9
    compress = 3 * (plan["admm_epochs"] + plan["finetune_epochs"]) * epoch * cifar10_gpu.COMPRESS_SLOWDOWN
    assert compress <= cifar10_gpu.COMPRESS_SHARE * 360 + 1e-9
    assert plan["admm_epochs"] >= 1 and plan["finetune_epochs"] >= 1


def test_cifar10_image_tree_is_decoded_once(tmp_path: Path) -> None:
    """A benchmark loads the same JPEG tree many times: the decoded tensors are cached per process."""
    import numpy as np
    from PIL import Image

    from cstar.data import load_dataset

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for label in range(10):
            folder = tmp_path / "cifar" / split / f"c{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    first = load_dataset(f"cifar10:{tmp_path / 'cifar'}")
    second = load_dataset(f"cifar10:{tmp_path / 'cifar'}")
    assert len(first.train) == 30 and len(first.test) == 20  # type: ignore[arg-type]
    assert first.train.images.data_ptr() == second.train.images.data_ptr()  # type: ignore[attr-defined]
    assert int(first.test.labels.sum()) == 2 * sum(range(10))  # type: ignore[attr-defined]


def test_seed_spread_paired_differences() -> None:
    """Paired differences are per seed (not difference of means), with the win count."""
    sys.path.insert(0, str(REPO))
    from benchmarks.seed_spread import paired_differences, parse_variant, summarize

    rows = [{"variant": v, "seed": s, "clean_acc": c, "robust_acc": r} for v, s, c, r in [
        ("cstar", 0, 0.90, 0.50), ("cstar", 1, 0.92, 0.40), ("prune", 0, 0.91, 0.45), ("prune", 1, 0.90, 0.44)]]
    diff = paired_differences(rows, "cstar", "prune")
    assert diff is not None and diff["wins"] == 1 and diff["pairs"] == 2
    assert abs(diff["robust"]["mean"] - 0.005) < 1e-12 and abs(diff["robust"]["min"] + 0.04) < 1e-12
    assert paired_differences(rows, "prune", "prune") is None
    stats = summarize([0.4, 0.5, 0.6])
    assert abs(stats["mean"] - 0.5) < 1e-12 and abs(stats["std"] - 0.1) < 1e-12
    assert parse_variant("cstar:rho=0.5+finetune_epochs=20") == (
        "cstar-rho0.5-finetune_epochs20", "cstar", {"rho": 0.5, "finetune_epochs": 20})


# ----------------------------------------------------------------------------------------- reuse


def _stage(directory: Path, stage: str, inputs: list[Path], **body: Any) -> Path:
    """A finished stage directory whose manifest records `inputs` with their sha256."""
    from cstar.manifest import file_entry

    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"schema_version": 1, "stage": stage, "inputs": [file_entry(p) for p in inputs], **body}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def _never() -> None:
    raise AssertionError("a finished stage was run again instead of being reused or refused")


def test_compress_config_drift_compares_every_field_with_defaults() -> None:
    """A run made with another configuration (here: before factor_decay existed, i.e. per-factor decay)
    differs; where it ran does not count; pruning has no factor decay to differ in."""
    sys.path.insert(0, str(REPO))
    from benchmarks.artifacts import compress_config_drift
    from cstar.compress import CompressConfig
    from cstar.config import config_to_dict

    stored = {**config_to_dict(CompressConfig(finetune_epochs=35, device="cpu")), "ratio": 8.0, "method": "cstar"}
    del stored["factor_decay"]
    wanted = {"ratio": 8.0, "method": "cstar", "finetune_epochs": 35, "device": "cuda", "factor_decay": "frobenius"}
    assert compress_config_drift(stored, wanted) == {"factor_decay": ("factors", "frobenius")}
    assert compress_config_drift(stored, {**wanted, "factor_decay": "factors"}) == {}  # device is ignored
    assert compress_config_drift(stored, {**wanted, "factor_decay": "factors", "seed": 1}) == {"seed": (0, 1)}
    assert compress_config_drift({**stored, "method": "prune"}, {**wanted, "method": "prune"}) == {}
    assert compress_config_drift(stored, {**wanted, "factor_decay": "factors", "finetune_epochs": 15}) == {
        "finetune_epochs": (35, 15)}


def test_compressed_set_refuses_a_run_with_another_config(tmp_path: Path) -> None:
    """compressed_set (deploy_speed, export_robustness) goes through the same check as compression_table:
    a finished compress directory made with other settings, or from another dense model, is refused."""
    sys.path.insert(0, str(REPO))
    from benchmarks.artifacts import StaleWork, compressed_set
    from cstar.compress import CompressConfig
    from cstar.config import config_to_dict

    dense = _stage(tmp_path / "dense", "train", [])
    other_dense = _stage(tmp_path / "dense2", "train", [])
    config = {**config_to_dict(CompressConfig(ratio=8.0, admm_epochs=1, finetune_epochs=0, eval_suite="apgd")),
              "eval_limit": 100}
    run = _stage(tmp_path / "compress" / "cstar-x8-e1+0", "compress", [dense / "manifest.json"], config=config)
    wanted = {"admm_epochs": 1, "finetune_epochs": 0, "eval_limit": 100}
    assert compressed_set(dense, tmp_path / "compress", ["cstar"], [8.0], wanted)["cstar-x8"].reused
    with pytest.raises(StaleWork, match=r"config.eval_suite='apgd' there, 'aa' wanted"):  # robust numbers differ
        compressed_set(dense, tmp_path / "compress", ["cstar"], [8.0], {**wanted, "eval_suite": "aa"})
    with pytest.raises(StaleWork, match=r"config.by='params' there, 'flops' wanted") as info:
        compressed_set(dense, tmp_path / "compress", ["cstar"], [8.0], {**wanted, "by": "flops"})
    assert info.value.hint is not None and f"delete {run}" in info.value.hint
    with pytest.raises(StaleWork, match=r"config.eval_limit=100 there, 200 wanted"):
        compressed_set(dense, tmp_path / "compress", ["cstar"], [8.0], {**wanted, "eval_limit": 200})
    with pytest.raises(StaleWork, match="it was not made from .*dense2"):
        compressed_set(other_dense, tmp_path / "compress", ["cstar"], [8.0], wanted)


def test_stage_made_from_changed_or_deleted_inputs_is_refused(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.artifacts import Expect, StaleWork, input_problems, run_or_reuse

    source = tmp_path / "model.safetensors"
    source.write_bytes(b"v1")
    export = _stage(tmp_path / "export", "export", [source])
    manifest = json.loads((export / "manifest.json").read_text())
    assert input_problems(manifest["inputs"]) == []
    assert run_or_reuse(export, "export", _never, Expect(sources=(source,))).reused
    source.write_bytes(b"v2")  # the source was made again
    with pytest.raises(StaleWork, match=f"input {source} has changed") as info:
        run_or_reuse(export, "export", _never)
    assert str(export) in info.value.message and f"delete {export}" in str(info.value.hint)
    source.unlink()  # a deleted input is a changed input, never "unchanged"
    with pytest.raises(StaleWork, match=f"input {source} was deleted"):
        run_or_reuse(export, "export", _never)
    assert input_problems([{"path": "digits", "sha256": None}]) == []  # nothing recorded to hash


def test_dense_run_with_other_epochs_is_refused(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.artifacts import StaleWork, ensure_dense

    config = {"data": "digits", "epochs": 1, "eps": 0.2, "seed": 0}
    _stage(tmp_path / "dense", "train", [], config=config)
    assert ensure_dense("digits", tmp_path / "dense", 1, 0.2, 0).reused
    with pytest.raises(StaleWork, match="config.epochs=1 there, 60 wanted"):  # None: the dataset's default
        ensure_dense("digits", tmp_path / "dense", None, 0.2, 0)
    with pytest.raises(StaleWork, match="config.seed=0 there, 1 wanted"):
        ensure_dense("digits", tmp_path / "dense", 1, 0.2, 1)


def _report(tmp_path: Path, queries: int = 50, n: int = 20) -> tuple[Path, Path, Path, Any]:
    """An artifact, an attack set and a verify report made from them."""
    import argparse

    from cstar.manifest import sha256_file

    artifact, attack_set, out = tmp_path / "onnx", tmp_path / "attackset", tmp_path / "verify"
    for folder in (artifact, attack_set, out):
        folder.mkdir()
    (artifact / "model.onnx").write_bytes(b"onnx")
    (attack_set / "attackset.npz").write_bytes(b"set")
    (attack_set / "manifest.json").write_text(json.dumps({"set": {"n": 40}}))
    report = {"backend": "ort-cpu",
              "artifact": {"path": str(artifact.resolve()), "model": "model.onnx",
                           "sha256": sha256_file(artifact / "model.onnx")},
              "set": {"path": str(attack_set.resolve()), "sha256": sha256_file(attack_set / "attackset.npz"),
                      "n": 40},
              "metrics": {"runtime": {"square": {"queries": queries, "n": n, "p_init": 0.05, "seed": 0, "restarts": 1,
                                                 "started_from_transfer": True}}}}
    (out / "report.json").write_text(json.dumps(report))
    args = argparse.Namespace(square_queries=50, square_samples=20, square_p_init=0.05, seed=0, threads=1)
    return artifact, attack_set, out, args


def test_verify_report_reuse_checks_hashes_and_square_budget(tmp_path: Path) -> None:
    """export_robustness reuses a verify report only for the same artifact and attack set (by sha256)
    and the same Square budget; otherwise it refuses and names the report's directory."""
    sys.path.insert(0, str(REPO))
    from benchmarks.artifacts import StaleWork
    from benchmarks.export_robustness import verify

    artifact, attack_set, out, args = _report(tmp_path)
    assert verify(artifact, attack_set, out, args)["backend"] == "ort-cpu"
    args.square_queries = 1000
    with pytest.raises(StaleWork, match="metrics.runtime.square.queries=50 there, 1000 wanted"):
        verify(artifact, attack_set, out, args)
    args.square_queries = 50
    with pytest.raises(StaleWork, match="artifact.path=.* there, .*elsewhere.* wanted"):
        verify(tmp_path / "elsewhere", attack_set, out, args)
    (artifact / "model.onnx").write_bytes(b"onnx, exported again")
    with pytest.raises(StaleWork, match="model.onnx has changed") as info:
        verify(artifact, attack_set, out, args)
    assert f"delete {out}" in str(info.value.hint)
    (artifact / "model.onnx").write_bytes(b"onnx")
    (attack_set / "attackset.npz").unlink()
    with pytest.raises(StaleWork, match="attackset.npz was deleted"):
        verify(artifact, attack_set, out, args)


def test_metric_cache_is_computed_again_when_its_inputs_change(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.artifacts import cached_json

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"v1")
    calls: list[int] = []

    def compute() -> dict[str, Any]:
        calls.append(1)
        return {"robust_acc": 0.5 + len(calls)}

    cache = tmp_path / "cache.json"
    assert cached_json(cache, [weights], {"queries": 50}, compute) == {"robust_acc": 1.5}
    assert cached_json(cache, [weights], {"queries": 50}, compute) == {"robust_acc": 1.5}  # reused
    assert cached_json(cache, [weights], {"queries": 100}, compute) == {"robust_acc": 2.5}  # other config
    weights.write_bytes(b"v2")
    assert cached_json(cache, [weights], {"queries": 100}, compute) == {"robust_acc": 3.5}  # other weights
    assert len(calls) == 3


@pytest.mark.slow
def test_latency_budget_quick(tmp_path: Path) -> None:
    """latency_budget --quick (~45 s): CIFAR-shape latency rows consistent with their p50s and budgets, the 16x
    target a measured row or an error naming the best reachable ratio; digits runs with accuracies, speedups
    recomputed from the p50s, budgets met as predicted, winner and Pareto plot present."""
    results = tmp_path / "results"
    done = _run(str(REPO / "benchmarks" / "latency_budget.py"), "--quick", "--work", str(tmp_path / "work"),
                "--results-dir", str(results))
    assert done.returncode == 0, done.stderr[-4000:]
    payload, markdown = _load(results, "latency_budget"), (results / "latency_budget_digits.md").read_text()
    for where, value in _accuracies(payload):
        assert value is None or 0.0 <= value <= 1.0, f"{where} = {value!r}"
    cifar = payload["cifar"]
    assert cifar["random_weights"] is True and "random weights" in markdown.lower()
    dense = {r["batch"]: r for r in cifar["rows"] if r["model"] == "dense"}
    assert set(dense) == {1, 8} and len(cifar["rows"]) > len(dense)
    for row in cifar["rows"]:
        assert row["p50_ms"] > 0 and row["predicted_ms"] > 0
        assert row["speedup"] == pytest.approx(dense[row["batch"]]["p50_ms"] / row["p50_ms"])
        assert row["prediction_error"] == pytest.approx((row["predicted_ms"] - row["p50_ms"]) / row["p50_ms"])
        if row["target"] is not None:
            assert row["of_target"] == pytest.approx(row["speedup"] / row["target"])
            if row["batch"] in row["budget_batches"]:  # the allocator met its budget: measured dense / predicted
                reference = cifar["table"]["dense_reference_ms"][str(row["batch"])]
                assert reference / row["predicted_ms"] >= row["target"] * (1 - 1e-9)
    for method in ("cstar", "prune"):
        measured = [r for r in cifar["rows"] if r["method"] == method and r["target"] == 16.0]
        errors = [e for e in cifar["errors"] if e["method"] == method and e["target"] == 16.0]
        assert bool(measured) != bool(errors), (method, measured, errors)
        for error in errors:  # the allocator's / pruning's message, naming the best reachable ratio
            assert "reach" in error["error"] and 1.0 < error["best_reachable"] < 16.0
            assert f"{error['best_reachable']:.2f}x" in error["error"] and error["error"] in markdown

    accuracy = payload["accuracy"]
    batch, dense_p50 = str(accuracy["latency_batch"]), accuracy["dense"]["p50_ms"]
    assert {r["method"] for r in accuracy["rows"]} == {"cstar", "prune", "lowrank-uniform"}
    for row in accuracy["rows"]:
        assert row["predicted_ms"] > 0 and row["predicted_speedup"] >= row["target"] * (1 - 1e-9)
        assert row["attack"]["suite"] == "apgd" and 0.0 <= row["robust_acc"] <= row["clean_acc"] + 0.05
        for size, p50 in row["p50_ms"].items():
            assert p50 > 0 and row["speedup"][size] == pytest.approx(dense_p50[size] / p50)
        assert accuracy["reachable"][row["method"]]["best"] >= row["target"]
    for item in accuracy["summary"]:
        assert item["n"] == 1 and item["speedup"] == pytest.approx(dense_p50[batch] / item["p50_ms"]["mean"])
    best = max(accuracy["summary"], key=lambda s: s["robust"]["mean"])
    assert accuracy["winners"][0]["winner"] == best["method"] and f"**{best['method']}**" in markdown
    plot = results / accuracy["plot"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({accuracy['plot']})" in markdown
