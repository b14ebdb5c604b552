"""The one-command pipeline: config validation, every stage filled in, fresh stages skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cstar.errors import CstarError
from deploy.pipeline import load_config, run_pipeline

TINY = """
[train]
epochs = 2
extra_args = ["--width", "8", "--train-steps", "1", "--eval-steps", "2"]

[compress]
ratio = 4
extra_args = ["--admm-epochs", "1", "--finetune-epochs", "1", "--eval-steps", "2", "--eval-limit", "100", "--quiet"]

[calibrate]
samples = 64

[verify]
samples = 60
square_queries = 20
max_robust_drop = 100.0

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
    assert load_config(None).compress.ratio == 8.0


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
    assert report["metrics"]["runtime"]["agreement"] >= 0.99
    assert report["metrics"]["runtime"]["max_abs_diff"] <= 1e-4
    int8 = json.loads((run_dir / "verify-int8-ort-cpu" / "report.json").read_text())
    assert int8["metrics"]["runtime"]["agreement"] >= 0.9
    bench = json.loads((run_dir / "bench-fp32-ort-cpu" / "bench.json").read_text())
    assert [r["batch_size"] for r in bench["results"]] == [1, 8] and all(r["p50_ms"] > 0 for r in bench["results"])
    assert summary.artifacts and all(a["clean_acc"] is not None for a in summary.artifacts if a["artifact"] != "dense")
    markdown = (run_dir / "report.md").read_text()
    assert "ranks" in markdown.lower() and "p50" in markdown

    again = run_pipeline(config, run_dir)
    assert {s.status for s in again} == {"skipped"}

    weights = run_dir / "compress" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    third = run_pipeline(config, run_dir)
    status = {s.key: s.status for s in third}
    assert status["train"] == "skipped" and status["compress"] == "ran" and status["export"] == "ran"
