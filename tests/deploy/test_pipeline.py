"""The one-command pipeline: config validation, every stage filled in, fresh stages skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cstar.errors import CstarError
from deploy.pipeline import load_config, run_pipeline
from tests.logit_checks import assert_fp32_parity, assert_int8_tracks_fp32

TINY = """
[train]
epochs = 2
extra_args = ["--width", "8", "--train-steps", "1", "--eval-suite", "apgd", "--eval-steps", "2"]

[compress]
ratio = 4
by = "params"
extra_args = ["--admm-epochs", "1", "--finetune-epochs", "1", "--eval-suite", "apgd", "--eval-steps", "2", "--eval-limit", "100", "--quiet"]

[calibrate]
samples = 64

[verify]
samples = 60
square_queries = 20
# The 2-epoch model is near-random: its INT8 agreement and accuracy count near-ties, which differ between
# CPUs. The gates are opened; the test bounds the runtimes' logit errors instead.
max_robust_drop = 100.0
extra_args = ["--min-agreement", "0", "--max-clean-drop", "100"]

[bench]
batch_sizes = [1, 8]
iters = 5
"""


def test_unknown_section_or_key_is_a_clear_error(tmp_path: Path) -> None:
    bad_section = tmp_path / "a.toml"
    bad_section.write_text("[trian]\nepochs = 1\n")
    with pytest.raises(CstarError, match="trian"):
        load_config(bad_section)
    bad_key = tmp_path / "b.toml"
    bad_key.write_text("[train]\nepochz = 1\n")
    with pytest.raises(CstarError, match="epochz"):
        load_config(bad_key)
    with pytest.raises(CstarError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_yaml_and_toml_agree(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[compress]\nratio = 16\nmethod = 'prune'\n")
    (tmp_path / "c.yaml").write_text("compress:\n  ratio: 16\n  method: prune\n")
    assert load_config(tmp_path / "c.toml") == load_config(tmp_path / "c.yaml")
    assert (load_config(None).compress.ratio, load_config(None).compress.by) == (2.0, "latency")


def _check_runtime_logits(run_dir: Path, reports: dict[str, dict]) -> None:
    """FP32 builds match the PyTorch reference to 1e-4; INT8 stays within a bound relative to the logit spread.

    Near-random model: top-1 margins of ~0.01 against INT8 errors of ~0.05, so INT8 agreement is a
    CPU-dependent count of near-ties. A correct quantization bounds the logit error: RMS 0.024-0.047 x spread
    measured over 8 training seeds (up to 0.10 with 7-bit weights, reduce_range); u8s8 kernels saturating on a
    CPU without VNNI gave 0.18-1.6 (OpenVINO, AVX2).
    """
    import deploy

    with np.load(run_dir / "attackset" / "attackset.npz") as data:
        x, reference = data["x_clean"], data["ref_logits_clean"]
    logits = {}
    for precision in reports:
        with deploy.load(run_dir / f"build-{precision}-ort-cpu") as predictor:
            logits[precision] = predictor.predict(x)
    assert_fp32_parity(reference, logits["fp32"], atol=1e-4)
    assert_int8_tracks_fp32(reference, logits["int8"], max_rel_rms=0.15, confident_margin=0.5)
    for precision, report in reports.items():  # verify reported these runtimes' numbers
        run, got = report["metrics"]["runtime"], logits[precision]
        assert run["n"] == x.shape[0] == 60
        assert run["max_abs_diff"] == pytest.approx(float(np.abs(got - reference).max()), rel=1e-2, abs=1e-6)
        agreement = float((got.argmax(1) == reference.argmax(1)).mean())
        assert run["agreement"] == pytest.approx(agreement, abs=1.5 / 60)


def test_tiny_pipeline_fills_every_stage_then_skips(tmp_path: Path) -> None:
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(TINY)
    config = load_config(config_file)
    run_dir = tmp_path / "run"
    stages = run_pipeline(config, run_dir)
    assert [s.status for s in stages if s.status != "ran"] == []
    from deploy.pipeline_report import write_pipeline_report

    summary = write_pipeline_report(run_dir, config, stages)
    for name in ("report.md", "report.html", "summary.json"):
        assert (run_dir / name).is_file()
    report = json.loads((run_dir / "verify-fp32-ort-cpu" / "report.json").read_text())
    int8 = json.loads((run_dir / "verify-int8-ort-cpu" / "report.json").read_text())
    _check_runtime_logits(run_dir, {"fp32": report, "int8": int8})
    bench = json.loads((run_dir / "bench-fp32-ort-cpu" / "bench.json").read_text())
    assert [r["batch_size"] for r in bench["results"]] == [1, 8] and all(r["p50_ms"] > 0 for r in bench["results"])
    assert summary.artifacts and all(a["clean_acc"] is not None for a in summary.artifacts if a["artifact"] != "dense")
    markdown = (run_dir / "report.md").read_text()
    assert "ranks" in markdown.lower() and "p50" in markdown
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings[0].startswith("## Verdict: gate ") and headings[-1] == "## Stage log"
    worst = {a["path"]: a["robust_acc"] for a in summary.artifacts if a["passed"] is not None}
    assert worst["build-int8-ort-cpu"] == int8["metrics"]["runtime"]["worst_case_robust_acc"]
    deployed = summary.deployed["ort-cpu"]
    p50 = {a["precision"]: a["p50_b1"] for a in summary.artifacts if a["artifact"] != "dense"}
    assert deployed["precision"] == min(p50, key=lambda k: p50[k]) and deployed["batch"] == 1
    assert json.loads((run_dir / "summary.json").read_text())["deployed"]["ort-cpu"]["build"] == deployed["build"]
    calibrate = json.loads((run_dir / "calibrate" / "manifest.json").read_text())
    assert calibrate["quantization"]["target"] == "ort-cpu"
    # INT8 is verified with the set that adds the attack crafted on its own fake-quant twin; FP32 without it
    twin_set = json.loads((run_dir / "attackset-int8-ort-cpu" / "manifest.json").read_text())
    assert twin_set["set"]["quantized"]["onnx_sha256"] == calibrate["onnx"]["sha256"]
    assert {"apgd_ce_fq", "apgd_t_fq"} <= set(int8["metrics"]["runtime"]["transfer"])
    assert not {"apgd_ce_fq", "apgd_t_fq"} & set(report["metrics"]["runtime"]["transfer"])
    assert not [w for w in int8["warnings"] if "fake-quant" in w]
    assert "robust_acc_twin_crafted" in calibrate["metrics"]
    assert (run_dir / "bench-dense-ort-cpu" / "bench.json").is_file()
    dense_report = json.loads((run_dir / "verify-dense-ort-cpu" / "report.json").read_text())
    dense_set = json.loads((run_dir / "attackset-dense" / "manifest.json").read_text())
    assert any(i["path"].endswith("train/model.safetensors") for i in dense_set["inputs"])  # crafted on dense
    dense_row = next(a for a in summary.artifacts if a["artifact"] == "dense")
    assert dense_row["robust_acc"] == dense_report["metrics"]["runtime"]["worst_case_robust_acc"]
    fp32_row = next(a for a in summary.artifacts if a["path"] == "build-fp32-ort-cpu")
    assert fp32_row["robust_vs_dense"] == pytest.approx(fp32_row["robust_acc"] - dense_row["robust_acc"])
    assert summary.verdict["verified"] == 2  # dense is the reference, not a deployed artifact
    compared = json.loads((run_dir / "bench-fp32-ort-cpu" / "bench.json").read_text())["compare"]
    assert compared["interleaved_rounds"] == 5 and compared["artifact"]["path"].endswith("build-dense-ort-cpu")
    assert fp32_row["speedup_vs_dense"] == {b: compared["speedup_p50"][b] for b in ("1", "8")}

    again = run_pipeline(config, run_dir)
    assert {s.status for s in again} == {"skipped"}

    weights = run_dir / "compress" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    third = run_pipeline(config, run_dir)
    status = {s.key: s.status for s in third}
    assert status["train"] == "skipped" and status["compress"] == "ran" and status["export"] == "ran"


def test_latency_budget_profiles_the_first_backend_before_compress(tmp_path: Path) -> None:
    """The default config compresses by latency: profile on the deploy backend at the select batch, then
    compress and export with that table (export picks the deploy forms by it)."""
    from deploy.pipeline import PipelineConfig, stage_plan

    config = PipelineConfig()
    config.verify.backends = ["openvino-cpu", "ort-cpu"]
    config.bench.batch_sizes = [8, 64]
    stages = {s.key: s for s in stage_plan(config, tmp_path)}
    keys = list(stages)
    assert config.compress.by == "latency" and keys.index("profile") < keys.index("compress")
    table = str(tmp_path / "profile" / "latency_table.json")
    profile = stages["profile"].argv
    assert profile[profile.index("--backend") + 1] == "openvino-cpu" and profile[profile.index("--out") + 1] == table
    assert profile[profile.index("--batch-sizes") + 1] == "8,64" and profile[profile.index("--threads") + 1] == "1"
    for key in ("compress", "export"):  # spent at the largest bench batch unless [compress] latency_batch says
        argv = stages[key].argv
        assert argv[argv.index("--latency-table") + 1] == table and argv[argv.index("--latency-batch") + 1] == "64"
    config.compress.latency_batch = 8
    assert next(s.argv[s.argv.index("--latency-batch") + 1] for s in stage_plan(config, tmp_path)
                       if s.key == "compress") == "8"
    config.compress.latency_batch = [1, 64]  # a budget held at both: profiled at both, passed on to both stages
    planned = {s.key: s.argv for s in stage_plan(config, tmp_path)}
    assert planned["profile"][planned["profile"].index("--batch-sizes") + 1] == "1,8,64"
    for key in ("compress", "export"):
        assert planned[key][planned[key].index("--latency-batch") + 1] == "1,64"
    assert "--latency-table" not in stages["export-dense"].argv
    assert stages["calibrate"].argv[stages["calibrate"].argv.index("--target") + 1] == "openvino"
    assert stages["calibrate-ort-cpu"].argv[stages["calibrate-ort-cpu"].argv.index("--target") + 1] == "ort-cpu"
    assert stages["build-int8-ort-cpu"].argv[1] == str(tmp_path / "calibrate-ort-cpu")
    assert {"verify-dense-openvino-cpu", "verify-dense-ort-cpu", "bench-dense-ort-cpu"} <= set(keys)


@pytest.mark.parametrize("exists", [False, True])
def test_a_stale_stage_is_rerun_with_force_only_over_its_own_directory(tmp_path: Path, exists: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import types

    import cstar.cli
    from deploy.pipeline import Stage, invoke

    seen: list[argparse.Namespace] = []
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--force", action="store_true")
    module = types.SimpleNamespace(main=lambda args: seen.append(args) or 0)
    monkeypatch.setattr(cstar.cli, "build_command_parser", lambda name: (parser, module))
    out = tmp_path / "export"
    if exists:
        out.mkdir()
    stage = Stage("export", "export", ["--out", str(out)], out, "t")
    invoke(stage)
    assert seen[0].force is exists and stage.argv == ["--out", str(out)]  # the recorded command line stays


def test_pipeline_refuses_a_run_dir_holding_user_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cstar.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    assert main(["pipeline", "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "not empty (notes.txt)" in err and "  fix: " in err
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]


def test_evaluate_section_defaults_to_aa_with_the_runtime_square_budget(tmp_path: Path) -> None:
    from deploy.pipeline import eval_args

    default = load_config(None)
    assert eval_args(default) == ["--eval-suite", "aa", "--eval-queries", "1000"]
    (tmp_path / "apgd.toml").write_text("[evaluate]\nsuite = 'apgd'\nsteps = 10\n")
    assert eval_args(load_config(tmp_path / "apgd.toml")) == ["--eval-suite", "apgd", "--eval-steps", "10"]
    (tmp_path / "bad.toml").write_text("[evaluate]\nqueries = -5\n")
    with pytest.raises(CstarError, match="queries"):
        load_config(tmp_path / "bad.toml")


@pytest.mark.parametrize("data,needle", [("cifar10", "needs a path"), ("cifar10:/no/such/dir", "/no/such/dir"),
                                         ("imagenet-22k", "unknown dataset")])
def test_cifar_config_with_bad_data_is_one_clear_error_before_any_stage(data: str, needle: str, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    from cstar.cli import main as cli_main

    config = Path(__file__).resolve().parents[2] / "examples" / "cifar10-cpu.toml"
    assert cli_main(["pipeline", "--config", str(config), "--data", data, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error:") and needle in err[0] and err[1].strip().startswith("fix:")
    assert not (tmp_path / "run").exists()


def test_quick_config_shrinks_sizes_and_keeps_the_recipe(tmp_path: Path) -> None:
    from deploy.pipeline import quick_config

    config = load_config(Path(__file__).resolve().parents[2] / "examples" / "cifar10-cpu.toml", f"cifar10:{tmp_path}")
    quick = quick_config(config)
    assert quick.train.epochs == 1 and config.train.epochs == 15  # the original is untouched
    assert quick.train.method == config.train.method == "n-fgsm" and quick.train.model == "preact-resnet18"
    assert quick.compress.extra_args[-4:] == ["--admm-epochs", "1", "--finetune-epochs", "0"]
    assert quick.compress.method == "cstar" and quick.compress.by == "latency" and quick.compress.ratio == 2.0
    assert (quick.verify.samples, quick.verify.square_queries, quick.evaluate.queries) == (50, 50, 50)
    assert quick.calibrate.samples == 64 and quick.bench.batch_sizes == [1]
    assert quick.verify.extra_args[-4:] == ["--min-agreement", "0", "--max-clean-drop", "100"]
    assert quick.verify.max_robust_drop == 100.0 and config.verify.max_robust_drop == 2.0
