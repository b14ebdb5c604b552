"""Reports lead with the verdict; the headline robust number is the per-example worst case over every attack.

A small run directory is written by hand (manifests, verify reports, bench results), so these tests
need no pipeline run: the verify report of one artifact is made by verify's own metric code from
known per-example outcomes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deploy.pipeline import PipelineConfig, Stage
from deploy.pipeline_report import summary_table, write_pipeline_report
from deploy.report import report_markdown, validate_report
from deploy.verify import AttackSet, reference_metrics, runtime_metrics, summary_line

N, CLASSES = 10, 3
WRONG = {"clean": {9}, "pgd": {0, 1, 9}, "fgsm": {2, 3}}  # per-attack 90 / 70 / 80 %; every attack: 50 %
WORST = 1 - len(set().union(*WRONG.values())) / N
OFFSET = {"clean": 0, "pgd": 100, "fgsm": 200}
DENSE_P50 = {1: 0.30, 8: 1.60}
FP32_P50 = {1: 0.10, 8: 0.40}  # 3.00x and 4.00x faster than dense
INT8_P50 = {1: 0.15, 8: 0.80}  # 2.00x and 2.00x


class _LookupRunner:
    """A 'runtime' whose answer per input is known: pixel 0 encodes (variant, example)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        logits = np.zeros((x.shape[0], CLASSES), dtype=np.float32)
        for row, code in enumerate(np.rint(x[:, 0, 0, 0] * 1000).astype(int)):
            variant = {0: "clean", 1: "pgd", 2: "fgsm"}[int(code) // 100]
            index = int(code) % 100
            label = index % CLASSES
            logits[row, (label + (index in WRONG[variant])) % CLASSES] = 1.0
        return logits


def _attack_set() -> AttackSet:
    labels = np.arange(N) % CLASSES
    x = {v: np.full((N, 1, 2, 2), 0.0, dtype=np.float32) for v in OFFSET}
    for variant, offset in OFFSET.items():
        x[variant][:, 0, 0, 0] = (offset + np.arange(N)) / 1000
    runner = _LookupRunner()
    ref = {v: runner.predict(x[v]) for v in OFFSET}
    return AttackSet(directory=Path("set"), manifest={"eps": 0.1, "norm": "linf"}, sha256="0" * 64, x=x["clean"],
                     labels=labels, ref_clean=ref["clean"], adv={"pgd": x["pgd"], "fgsm": x["fgsm"]},
                     ref_adv={"pgd": ref["pgd"], "fgsm": ref["fgsm"]})


def _report(precision: str, runtime: dict[str, Any], reference: dict[str, Any], passed: bool) -> dict[str, Any]:
    failed = [] if passed else ["robust_drop"]
    return {
        "schema_version": 1, "backend": "ort-cpu",
        "artifact": {"path": f"/runs/demo/build-{precision}-ort-cpu", "sha256": "a" * 64, "precision": precision},
        "hardware": {}, "versions": {"python": "3"}, "thresholds": {"max_robust_drop": 2.0}, "passed": passed,
        "failed_checks": failed,
        "checks": [{"name": "robust_drop", "value": 0.0 if passed else 9.0, "op": "<=", "threshold": 2.0,
                    "passed": passed}],
        "metrics": {"reference": reference, "runtime": runtime}, "warnings": [],
        "set": {"path": "/runs/demo/attackset", "sha256": "b" * 64, "n": N}, "eps": 0.1,
    }


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _bench(p50: dict[int, float]) -> dict[str, Any]:
    return {"results": [{"batch_size": b, "p50_ms": ms} for b, ms in p50.items()]}


def _run_dir(root: Path, int8_passes: bool) -> Path:
    """train, compress, two verified artifacts (fp32 from verify's metric code, int8 by hand), three benches."""
    attack_set = _attack_set()
    no_square = {"queries": 0, "samples": None, "p_init": 0.05, "seed": 0}
    runtime, _ = runtime_metrics(_LookupRunner(), attack_set, 0.1, "linf", no_square)
    reference = reference_metrics(attack_set)
    int8 = {**runtime, "clean_acc": 0.8, "transfer": {"pgd": 0.6, "fgsm": 0.7},
            "square": {"queries": 50, "robust_acc": 0.65, "n": N}, "worst_case_robust_acc": 0.4}
    suite = {"suite": "apgd", "eps": 0.1, "norm": "linf", "n": N, "iterations_overridden": False,
             "attacks": [{"name": "apgd-ce", "settings": {"n_iter": 100}, "robust_acc": 0.6},
                         {"name": "apgd-t", "settings": {"n_iter": 100, "n_targets": 3}, "robust_acc": 0.55}],
             "warnings": ["PGD-20 reads 12.0 points above the apgd suite"]}
    _write(root / "train" / "manifest.json", {"params": 1000, "flops": 9000, "metrics": {
        "clean_acc": 0.95, "robust_acc": 0.55, "attack": suite, "pgd20_robust_acc": 0.67}})
    _write(root / "compress" / "manifest.json", {
        "params": 250, "flops": 3000, "compression": {"params_ratio": 4.0, "flops_ratio": 3.0},
        "metrics": {"clean_acc": 0.9, "robust_acc": 0.5, "attack": {"name": "pgd", "steps": 20}},
        "ranks": {"net.conv": {"kind": "tucker2", "ranks": [2, 3], "shape": [8, 8, 3, 3]}}})
    _write(root / "verify-fp32-ort-cpu" / "report.json", _report("fp32", runtime, reference, True))
    _write(root / "verify-int8-ort-cpu" / "report.json", _report("int8", int8, reference, int8_passes))
    for kind, p50 in (("fp32", FP32_P50), ("int8", INT8_P50), ("dense", DENSE_P50)):
        _write(root / f"bench-{kind}-ort-cpu" / "bench.json", _bench(p50))
        _write(root / f"build-{kind}-ort-cpu" / "manifest.json", {"params": 1000 if kind == "dense" else 250})
    return root


def _stages() -> list[Stage]:
    keys = ["train", "compress", "export", "verify-fp32-ort-cpu", "verify-int8-ort-cpu", "bench-dense-ort-cpu"]
    return [Stage(k, k.split("-")[0], [], None, f"the {k} stage", seconds=1.5, status="ran") for k in keys]


def _config() -> PipelineConfig:
    config = PipelineConfig()
    config.bench.batch_sizes = [1, 8]
    return config


@pytest.fixture(scope="module")
def passing_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = _run_dir(tmp_path_factory.mktemp("run-pass"), int8_passes=True)
    return root, write_pipeline_report(root, _config(), _stages())


def test_verify_metrics_take_the_per_example_worst_case() -> None:
    runtime, _ = runtime_metrics(_LookupRunner(), _attack_set(), 0.1, "linf",
                                  {"queries": 0, "samples": None, "p_init": 0.05, "seed": 0})
    assert runtime["clean_acc"] == pytest.approx(0.9)
    assert runtime["transfer"] == pytest.approx({"pgd": 0.7, "fgsm": 0.8})
    assert runtime["worst_case_robust_acc"] == pytest.approx(WORST) == pytest.approx(0.5)


def test_summary_robust_column_is_the_worst_case(passing_run: tuple[Path, Any]) -> None:
    root, summary = passing_run
    fp32 = next(a for a in summary.artifacts if a["precision"] == "fp32" and a["artifact"] != "dense")
    assert fp32["robust_acc"] == pytest.approx(0.5)  # not min over attacks (0.7)
    assert fp32["speedup_vs_dense"] == pytest.approx({"1": 3.0, "8": 4.0})
    saved = json.loads((root / "summary.json").read_text())
    by_name = {a["artifact"]: a for a in saved["artifacts"]}
    assert by_name["compressed fp32"]["robust_acc"] == pytest.approx(0.5)
    assert by_name["compressed int8"]["robust_acc"] == pytest.approx(0.4)
    assert by_name["compressed int8"]["worst_case"] == pytest.approx(0.4)  # the existing key is kept
    assert saved["verdict"] == {"passed": True, "verified": 2, "failed": []}
    assert [m["robust_acc"] for m in saved["models"]] == [0.55, 0.5]

    lines = summary_table(summary).splitlines()
    header = lines[0].split()
    assert header[:5] == ["model", "/", "artifact", "params", "clean%"] and header[5] == "robust%"
    assert header[6:9] == ["fgsm%", "pgd%", "square%"]  # single attacks come after the headline
    row = next(line for line in lines if line.startswith("compressed fp32 @ort-cpu")).split()
    assert row[3:8] == ["250", "90.0", "50.0", "80.0", "70.0"] and row[-2:] == ["3.00x", "pass"]
    dense = next(line for line in lines if line.startswith("dense (PyTorch, apgd suite)")).split()
    assert dense[-7:-4] == ["55.0", "-", "67.0"]  # worst case, then PGD-20 in the pgd% column (not the headline)
    assert next(line for line in lines if line.startswith("compressed (PyTorch, PGD-20)"))  # a schema-1 manifest
    assert lines[-2].startswith("Verdict: gate PASSED")
    assert lines[-1] == ("Deployed on ort-cpu: compressed fp32 in deploy-ort-cpu/ (speedup vs dense 3.00x at b1): "
                         "fastest of the precisions that passed verification at batch 1: fp32 0.100 ms vs int8 0.150 ms")


def test_report_opens_with_the_verdict_and_ends_with_the_stage_log(passing_run: tuple[Path, Any]) -> None:
    root, _ = passing_run
    md = (root / "report.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Verdict: gate PASSED (2 of 2 deployed artifacts)"
    assert headings[-1] == "## Stage log"
    verdict = md[md.index(headings[0]): md.index(headings[1])]
    fp32 = next(line for line in verdict.splitlines() if "compressed fp32" in line)
    assert "ort-cpu" in fp32 and "build-fp32-ort-cpu" in fp32 and "PASSED" in fp32
    assert "robust **50.0%**" in fp32 and "clean 90.0%" in fp32 and "3.00x (b1), 4.00x (b8)" in fp32
    int8 = next(line for line in verdict.splitlines() if "compressed int8" in line)
    assert "robust **40.0%**" in int8 and "fgsm, pgd, square" in int8 and "2.00x (b1)" in int8
    assert "dense (PyTorch) clean 95.0%, apgd suite robust 55.0%" in verdict
    assert "| dense (PyTorch) | PGD-20 reads 12.0 points above the apgd suite |" in md
    assert md.index("| train | the train stage | ran | 1.5 |") > md.index("## Ranks per layer")

    page = (root / "report.html").read_text()
    assert page.index("gate PASSED") < page.index("Deployed artifacts") < page.index("Stage log")
    assert "<div class='verdict pass'>" in page and "<strong>50.0%</strong>" in page


def test_failed_gate_is_the_first_thing_said(tmp_path: Path) -> None:
    root = _run_dir(tmp_path, int8_passes=False)
    summary = write_pipeline_report(root, _config(), _stages())
    md = (root / "report.md").read_text()
    first = next(line for line in md.splitlines() if line.startswith("## "))
    assert first == "## Verdict: gate FAILED (1 of 2 deployed artifacts: compressed int8 on ort-cpu)"
    assert "gate **FAILED** (robust_drop)" in md
    assert "<div class='verdict fail'>" in (root / "report.html").read_text()
    lines = summary_table(summary).splitlines()
    assert lines[-2].startswith("Verdict: gate FAILED")
    assert "the only precision that passed verification" in lines[-1] and "int8 failed its gate (robust_drop)" in lines[-1]
    assert summary.deployed["ort-cpu"]["precision"] == "fp32"  # the failed INT8 is never shipped


def _overlaps(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _legend_clear_of_bars(fig: Any) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    for ax in fig.axes:
        bars = [p.get_window_extent(renderer) for p in ax.patches if p.get_height() > 0]
        assert bars
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(_overlaps(box, bar) for bar in bars)
            assert box.y1 <= ax.get_window_extent(renderer).y0 + 1  # below the axes


def test_plots_show_the_dense_reference_and_no_legend_covers_a_bar(passing_run: tuple[Path, Any]) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from deploy.pipeline_report import accuracy_figure, latency_figure
    from deploy.report import plot_figure

    root, summary = passing_run
    assert {"accuracy.png", "latency.png", "ranks.png"} <= {p.name for p in root.glob("*.png")}
    accuracy = accuracy_figure(summary)
    ticks = [t.get_text() for t in accuracy.axes[0].get_xticklabels()]
    assert ticks[0] == "dense\n(PyTorch)" and "compressed fp32\nort-cpu" in ticks
    _legend_clear_of_bars(accuracy)
    latency = latency_figure(summary)
    assert latency.axes[0].get_xticklabels()[0].get_text().startswith("dense")
    report = json.loads((root / "verify-fp32-ort-cpu" / "report.json").read_text())
    _legend_clear_of_bars(plot_figure(report))
    plt.close("all")


def test_verify_report_and_terminal_line_lead_with_the_worst_case(passing_run: tuple[Path, Any]) -> None:
    root, _ = passing_run
    report = json.loads((root / "verify-int8-ort-cpu" / "report.json").read_text())
    validate_report(report)
    lines = [line for line in report_markdown(report).splitlines() if line.strip()]
    assert lines[0] == "# cstar verify: ort-cpu"
    assert lines[1].startswith("**PASSED**: `build-int8-ort-cpu`, int8 on ort-cpu: robust **40.00%** (worst case over "
                               "fgsm, pgd, square; n=10), clean 80.00%")
    line = summary_line(report)
    assert line.startswith("verify ort-cpu: PASSED robust(worst case)=0.4000 clean=0.8000 | detail:")
    assert "pgd=0.6000" in line and "square=0.6500" in line


def test_artifact_directory_names_have_one_source() -> None:
    from deploy.run_layout import ArtifactDir, parse_artifact_dir

    parts = parse_artifact_dir("verify-int8-openvino-cpu")
    assert parts == ArtifactDir("verify", "int8", "openvino-cpu") and parts.sibling("build").name == "build-int8-openvino-cpu"
    for bad in ("verify", "verify-bf16-ort-cpu", "attackset-int8-"):
        with pytest.raises(ValueError):
            parse_artifact_dir(bad)
