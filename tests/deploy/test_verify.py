"""attackset -> verify (gate, report schema), Square on ONNX Runtime, predict and bench on real exports."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cstar.cli import main as cli_main
from cstar.errors import CstarError
from cstar.manifest import read_manifest, sha256_file
from deploy.attackset import run_attackset
from deploy.bench import run_bench
from deploy.report import REPORT_SCHEMA, markdown_table, validate_report
from deploy.verify import (
    GRADIENT_MASKING_WARNING,
    SQUARE_STALLED_WARNING,
    AttackSet,
    Thresholds,
    add_arguments,
    gate_checks,
    load_attackset,
    run_verify,
    square_plan,
    square_warnings,
    stratified_subset,
)

SET_ATTACKS = ("apgd_ce", "apgd_t", "pgd", "fgsm")
SET_KEYS = {"x_clean", "labels", "indices", "ref_logits_clean", *(f"adv_{a}" for a in SET_ATTACKS),
            *(f"ref_logits_{a}" for a in SET_ATTACKS)}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("verify")


@pytest.fixture(scope="module")
def robust_export(robust_digits_dir: Path, work: Path) -> Path:
    from export.exporter import run_export

    run_export(robust_digits_dir, work / "export", parity_samples=64, progress=False)
    return work / "export"


@pytest.fixture(scope="module")
def robust_build(robust_export: Path, work: Path) -> Path:
    from deploy.build import run_build

    run_build(robust_export, "ort-cpu", work / "build", batch_sizes=(1, 4, 64), threads=1)
    return work / "build"


@pytest.fixture(scope="module")
def attack_set(robust_digits_dir: Path, work: Path) -> Path:
    run_attackset(robust_digits_dir, "digits", work / "set", samples=100)
    return work / "set"


def test_attackset_contents(attack_set: Path, robust_digits_dir: Path) -> None:
    manifest = read_manifest(attack_set, ("attackset",))
    assert manifest["eps"] == 0.2 and manifest["norm"] == "linf" and manifest["set"]["n"] == 100
    assert manifest["set"]["attacks"]["pgd"]["steps"] == 20 and manifest["set"]["attacks"]["fgsm"]["steps"] == 1
    assert len(manifest["inputs"]) == 2 and manifest["dataset"]["name"] == "digits"
    with np.load(attack_set / "attackset.npz") as data:
        assert set(data.files) == SET_KEYS
        x, y = data["x_clean"], data["labels"]
        assert x.shape == (100, 1, 16, 16) and x.dtype == np.float32 and y.dtype == np.int64
        for name in SET_ATTACKS:  # every attack stays in the eps-ball and [0,1]
            adv = data[f"adv_{name}"]
            assert np.abs(adv - x).max() <= 0.2 + 1e-6 and adv.min() >= 0 and adv.max() <= 1, name
        assert np.bincount(y).min() >= 9  # stratified
        worst = data["ref_logits_clean"].argmax(1) == y
        for name in SET_ATTACKS:
            worst &= data[f"ref_logits_{name}"].argmax(1) == y
    assert manifest["set"]["suite"] == "aa" and manifest["set"]["attacks"]["apgd_t"]["n_targets"] == 9
    assert manifest["set"]["attacks"]["apgd_ce"]["n_iter"] == 100
    metrics = manifest["metrics"]
    assert metrics["clean_acc"] >= 0.8 and metrics["robust_acc"] < metrics["clean_acc"]
    assert metrics["robust_acc"] == pytest.approx(worst.mean())  # per-example worst case over every attack
    per = metrics["per_attack"]
    assert metrics["robust_acc"] <= min(per.values()) and per["apgd_t"] <= per["apgd_ce"]
    assert per["apgd_t"] <= per["pgd"] + 0.02  # the suite is at least as strong as PGD-20 on the reference
    assert metrics["fgsm_robust_acc"] >= metrics["pgd_robust_acc"] - 0.05
    with pytest.raises(CstarError, match="does not match"):
        run_attackset(robust_digits_dir, "fashion-mnist", attack_set.parent / "bad-set", samples=10)


def test_verify_passes_on_fp32_export(robust_export: Path, attack_set: Path, work: Path) -> None:
    out = work / "report-fp32"
    report = run_verify(robust_export, attack_set, out, backend="ort-cpu", square_queries=1000)
    assert report["passed"] and report["failed_checks"] == []
    run = report["metrics"]["runtime"]
    ref = report["metrics"]["reference"]
    assert run["agreement"] >= 0.98 and run["max_abs_diff"] < 1e-3
    assert abs(run["clean_acc"] - ref["clean_acc"]) <= 0.01
    assert abs(run["transfer"]["pgd"] - ref["transfer"]["pgd"]) <= 0.02
    square = run["square"]
    assert square["queries"] == 1000 and square["n"] == 100 and square["p_init"] == 0.8 and square["restarts"] == 1
    assert square["seed"] == 0 and square["started_from_transfer"] is True and square["strict"] is False
    assert 0 < square["mean_queries"] <= 1000 and square["flat_fraction"] < 0.05  # FP32 logits: no plateaus
    # started from the transfer examples, Square is never weaker than transfer on its subset (here: the whole set)
    assert square["robust_acc"] <= run["transfer_worst_case_robust_acc"] + 1e-9
    assert square["broke_transfer_survivors"] == round(
        100 * (run["transfer_worst_case_robust_acc"] - square["robust_acc"])) == square["transfer_survivors"] - round(
        100 * square["robust_acc"])
    assert square["alone_check"]["n"] == round(100 * (run["clean_acc"] - run["transfer_worst_case_robust_acc"]))
    # Square alone (1000 queries, the pipeline's budget) finds most of them too
    assert square["alone_check"]["broken"] >= 0.85 * square["alone_check"]["n"]
    assert run["worst_case_robust_acc"] == square["robust_acc"]
    assert report["warnings"] == []
    assert ref["square"] is None
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    validate_report(saved)
    assert set(REPORT_SCHEMA["required"]) <= set(saved)
    assert (out / "report.png").stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "| check | value | threshold | result |" in text and "worst-case robust" in text


def test_square_options_defaults_strict_and_validation(robust_export: Path, attack_set: Path, work: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--artifact", "a", "--set", "s", "--out", "o"])
    assert (args.square_queries, args.square_samples, args.square_p_init, args.square_restarts, args.strict) == (
        None, None, 0.8, 1, False)
    assert square_plan(360, None, None, False) == (1000, 200) and square_plan(150, None, None, False) == (1000, 150)
    assert square_plan(5000, None, None, True) == (5000, 1000) and square_plan(360, None, None, True) == (5000, 360)
    assert square_plan(360, 30, 50, True) == (30, 50) and square_plan(20, 0, 50, False) == (0, 20)
    for bad in (["--square-p-init", "0"], ["--square-p-init", "1.5"], ["--square-restarts", "0"],
                ["--square-queries", "-1"], ["--square-samples", "-3"], ["--seed", "-2"]):
        out = work / "bad-square"
        code = cli_main(["verify", "--artifact", str(robust_export), "--set", str(attack_set), "--out", str(out), *bad])
        assert code == 2 and "error:" in capsys.readouterr().err and not out.exists(), bad
    report = run_verify(robust_export, attack_set, work / "strict", strict=True, square_queries=20, square_samples=40,
                        square_restarts=2, seed=3)
    square = report["metrics"]["runtime"]["square"]
    assert (square["strict"], square["queries"], square["n"], square["restarts"], square["seed"]) == (True, 20, 40, 2, 3)
    assert report["metrics"]["runtime"]["worst_case_n"] == 40
    # 20 queries is far too few for Square alone to find what transfer finds: the stall warning says so
    assert any(w.startswith(SQUARE_STALLED_WARNING) for w in report["warnings"]), report["warnings"]


def _disagreeing_set(attack_set: Path, out: Path) -> Path:
    """A copy of the set whose reference clean logits rank the classes backwards (sha256 updated): the runtime
    disagrees with that reference on every example, so only the agreement check fails (the reference's clean
    and robust accuracy only go down)."""
    shutil.copytree(attack_set, out)
    with np.load(out / "attackset.npz") as data:
        arrays = {key: data[key] for key in data.files}
    arrays["ref_logits_clean"] = np.ascontiguousarray(-arrays["ref_logits_clean"])
    np.savez_compressed(out / "attackset.npz", **arrays)  # type: ignore[arg-type]
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["set"]["sha256"] = sha256_file(out / "attackset.npz")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_gate_failure_exit_code_and_report(robust_build: Path, attack_set: Path, work: Path) -> None:
    """A failed gate (valid thresholds, a runtime that disagrees) exits 1; a threshold outside its range
    (--min-agreement 1.01) is a bad argument instead (exit 2, tests/test_bad_inputs.py)."""
    out = work / "report-fail"
    disagreeing = _disagreeing_set(attack_set, work / "set-disagree")
    code = cli_main(["verify", "--artifact", str(robust_build), "--set", str(disagreeing), "--square-queries", "0",
                     "--out", str(out)])
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["failed_checks"] == ["agreement"]
    assert report["backend"] == "ort-cpu" and report["metrics"]["runtime"]["square"] is None
    validate_report(report)
    assert "FAIL" in (out / "report.md").read_text()


def test_verify_rejects_bad_inputs(robust_export: Path, attack_set: Path, work: Path) -> None:
    tampered = work / "set-tampered"
    shutil.copytree(attack_set, tampered)
    with open(tampered / "attackset.npz", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(CstarError, match="sha256"):
        load_attackset(tampered)
    with pytest.raises(CstarError, match="attackset"):
        run_verify(robust_export, robust_export, work / "nope", thresholds=Thresholds())
    with pytest.raises(CstarError, match="schema"):
        validate_report({"schema_version": 1, "backend": "ort-cpu"})
    assert markdown_table(["a", "b"], [[0.5, None]]) == "| a | b |\n|---|---|\n| 0.5000 | - |\n"


def test_square_on_ort_lowers_standard_model(standard_digits_dir: Path, work: Path) -> None:
    from cstar.data import load_dataset, stratified_indices, to_tensors
    from cstar.square import square_attack
    from deploy.artifact import load_artifact, open_runner
    from export.exporter import run_export

    run_export(standard_digits_dir, work / "std-export", parity_samples=32, progress=False)
    bundle = load_dataset("digits")
    images, labels = to_tensors(bundle.test, stratified_indices(bundle.labels("test"), 100, seed=1))
    x, y = images.numpy(), labels.numpy()
    with open_runner(load_artifact(work / "std-export"), "ort-cpu") as runner:
        clean = float((runner.predict(x).argmax(axis=1) == y).mean())
        result = square_attack(runner.predict, x, y, eps=0.2, n_queries=300, seed=0)
        robust = float((runner.predict(result.x_adv).argmax(axis=1) == y).mean())
    assert robust == pytest.approx(result.robust_acc)
    assert clean >= 0.8 and clean - robust >= 0.20, (clean, robust)


def test_predict_png_matches_pytorch(robust_digits_dir: Path, robust_export: Path, work: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from PIL import Image

    from cstar.checkpoint import load_checkpoint
    from cstar.data import load_dataset, to_tensors
    from deploy.predict import run_predict

    model, manifest = load_checkpoint(robust_digits_dir)
    images, _ = to_tensors(load_dataset("digits").test, [3, 17])
    paths = []
    pixels = np.round(images.numpy()[:, 0] * 255).astype(np.uint8)
    for i, array in enumerate(pixels):
        paths.append(str(work / f"digit{i}.png"))
        Image.fromarray(array, mode="L").save(paths[-1])
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels[:, None].astype(np.float32) / 255)).argmax(1).tolist()
    results = run_predict(robust_export, paths, top_k=3)
    classes = manifest["dataset"]["classes"]
    assert [r["top"][0]["class"] for r in results] == [classes[i] for i in expected]
    assert all(len(r["top"]) == 3 for r in results)
    assert cli_main(["predict", "--artifact", str(robust_export), "--json", *paths]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] == classes[expected[0]]
    with pytest.raises(CstarError, match="bogus.png"):
        (work / "bogus.png").write_bytes(b"not an image")
        run_predict(robust_export, [str(work / "bogus.png")])


def test_bench_writes_results(robust_build: Path, robust_export: Path, work: Path) -> None:
    out = work / "bench"
    result = run_bench(robust_build, out, batch_sizes=[1, 4], iters=6, warmup=1, compare=robust_export, rounds=3)
    saved = json.loads((out / "bench.json").read_text())
    assert [r["batch_size"] for r in saved["results"]] == [1, 4]
    assert all(r["p50_ms"] > 0 and r["throughput"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in saved["results"])
    assert saved["backend"] == "ort-cpu" and saved["flops"] == result["flops"] > 0
    assert set(saved["compare"]["speedup_p50"]) == {"1", "4"} and saved["compare"]["flops_ratio"] == 1.0
    for mine, theirs in zip(saved["results"], saved["compare"]["results"], strict=True):  # interleaved rounds
        assert len(mine["rounds_p50_ms"]) == len(theirs["rounds_p50_ms"]) == 3 and mine["iters"] == 6
        ratios = [o / t for o, t in zip(theirs["rounds_p50_ms"], mine["rounds_p50_ms"], strict=True)]
        assert saved["compare"]["speedup_p50"][str(mine["batch_size"])] == pytest.approx(float(np.median(ratios)))
    assert saved["settings"]["rounds"] == 3 and saved["compare"]["interleaved_rounds"] == 3
    assert saved["environment"]["cpu_count"] >= 1
    assert "| batch | p50 ms |" in (out / "bench.md").read_text()


def test_gate_math_and_square_warnings() -> None:
    y = np.array([0, 1, 0, 1])
    logits = np.eye(2)[y] * 5
    attack_set = AttackSet(Path("."), {}, "0" * 64, np.zeros((4, 1, 2, 2), np.float32), y, logits,
                           {"pgd": np.zeros((4, 1, 2, 2), np.float32)}, {"pgd": logits})
    square = {"robust_acc": 0.3, "n": 100, "started_from_transfer": True, "transfer_survivors": 45,
              "broke_transfer_survivors": 15, "alone_check": {"n": 45, "broken": 44}, "flat_fraction": 0.05}
    runtime = {"clean_acc": 0.75, "agreement": 0.75, "worst_case_robust_acc": 0.5, "square": square,
               "transfer_worst_case_robust_acc": 0.5}
    reference = {"clean_acc": 1.0, "worst_case_robust_acc": 1.0}
    assert square_warnings(runtime) == []  # what a correct default run looks like (digits 8x: 12 points, 0-1 missed)
    masked = square_warnings({"square": {**square, "broke_transfer_survivors": 25}})
    assert len(masked) == 1 and masked[0].startswith(GRADIENT_MASKING_WARNING) and "25 of the 45" in masked[0]
    assert square_warnings({"square": {**square, "broke_transfer_survivors": 25, "started_from_transfer": False}}) == []
    stalled = square_warnings({"square": {**square, "alone_check": {"n": 45, "broken": 30}, "flat_fraction": 0.6}})
    assert len(stalled) == 1 and stalled[0].startswith(SQUARE_STALLED_WARNING) and "missed 15 of the 45" in stalled[0]
    assert square_warnings({"square": None}) == [] and square_warnings({"square": {**square, "n": 0}}) == []
    checks = {c["name"]: c for c in gate_checks(reference, runtime, attack_set, np.arange(4), Thresholds())}
    assert checks["agreement"]["passed"] is False
    assert checks["clean_drop"]["value"] == 25.0 and not checks["clean_drop"]["passed"]
    assert checks["robust_drop"]["value"] == 50.0 and not checks["robust_drop"]["passed"]
    relaxed = Thresholds(min_agreement=0.7, max_clean_drop=30, max_robust_drop=60)
    assert all(c["passed"] for c in gate_checks(reference, runtime, attack_set, np.arange(4), relaxed))
    subset = stratified_subset(np.repeat(np.arange(4), 10), 8)
    assert np.bincount(np.repeat(np.arange(4), 10)[subset]).tolist() == [2, 2, 2, 2]


def test_reference_suite_warnings_reach_the_verify_report() -> None:
    from deploy.verify import reference_warnings

    manifest = {"reference_suite": "aa", "reference_warnings": ["Square (black-box) fooled 3 point(s)", 7]}
    assert reference_warnings(manifest) == ["reference model (aa diagnostics): Square (black-box) fooled 3 point(s)"]
    assert reference_warnings({}) == []
