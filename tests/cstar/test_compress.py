"""`cstar compress` end to end on the robust digits fixture (tiny epoch budgets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cstar.checkpoint import load_checkpoint
from cstar.cli import main as cli_main
from cstar.compress import CompressConfig, run_compress
from cstar.data import load_dataset, to_tensors
from cstar.errors import CstarError
from cstar.flops import count_params
from cstar.lowrank import LowRankConv2d

TINY = {"admm_epochs": 1, "finetune_epochs": 1, "train_steps": 2, "eval_steps": 3, "eval_limit": 60,
        "realloc_epochs": 1}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    images, _ = to_tensors(load_dataset("digits").test, limit=32)
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("method", ["cstar", "prune", "lowrank-uniform"])
def test_compress_round_trip(method: str, robust_digits_dir: Path, tmp_path: Path) -> None:
    manifest = run_compress(robust_digits_dir, tmp_path / method, ratio=3.0, method=method, config=TINY,
                            progress=False)
    assert manifest["stage"] == "compress"
    assert manifest["compression"]["params_ratio"] >= 3.0
    assert manifest["eps"] == 0.2 and manifest["norm"] == "linf"
    assert {"clean_acc", "robust_acc", "attack"} <= set(manifest["metrics"])
    assert len(manifest["inputs"]) == 2
    model, loaded = load_checkpoint(tmp_path / method)
    dense, _ = load_checkpoint(robust_digits_dir)
    assert count_params(dense) / count_params(model) >= 3.0
    assert count_params(model) == loaded["params"]
    kinds = {entry["kind"] for entry in manifest["ranks"].values()}
    if method == "prune":
        assert "pruned" in kinds
        assert not any(isinstance(m, LowRankConv2d) for m in model.modules())
    else:
        assert "tucker2" in kinds
        assert any(isinstance(m, LowRankConv2d) for m in model.modules())
    # reloading twice gives the same logits, and the same as the manifest's own model did at save time
    again, _ = load_checkpoint(tmp_path / method)
    assert torch.equal(_logits(model), _logits(again))


def test_reloaded_logits_match_saved_model(robust_digits_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import cstar.checkpoint as checkpoint

    saved: dict[str, torch.nn.Module] = {}
    original = checkpoint.save_checkpoint

    def spy(out_dir, model, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved["model"] = model
        return original(out_dir, model, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", spy)
    config = {**TINY, "admm_epochs": 1, "finetune_epochs": 0, "eval_dense": False}
    run_compress(robust_digits_dir, tmp_path / "c", ratio=2.0, config=config, progress=False)
    model, _ = load_checkpoint(tmp_path / "c")
    assert torch.allclose(_logits(saved["model"].eval()), _logits(model), atol=0, rtol=0)


def test_impossible_ratio_is_a_user_error(robust_digits_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CstarError, match="at most"):
        run_compress(robust_digits_dir, tmp_path / "x", ratio=500.0, config=TINY, progress=False)
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_config_rejects_unknown_keys_and_bad_values(robust_digits_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CstarError, match="unknown key"):
        run_compress(robust_digits_dir, tmp_path / "x", ratio=2.0, config={"epochz": 1}, progress=False)
    with pytest.raises(CstarError):
        CompressConfig(method="magic").validate()
    with pytest.raises(CstarError):
        CompressConfig(ratio=0.5).validate()


def test_cli_flops_budget(robust_digits_dir: Path, tmp_path: Path, capsys) -> None:
    code = cli_main(["compress", "--from", str(robust_digits_dir), "--out", str(tmp_path / "f"), "--ratio", "2",
                     "--by", "flops", "--method", "lowrank-uniform", "--admm-epochs", "0", "--finetune-epochs", "1",
                     "--train-steps", "1", "--eval-steps", "2", "--eval-limit", "40", "--quiet"])
    assert code == 0
    assert "flops x" in capsys.readouterr().out
    _, manifest = load_checkpoint(tmp_path / "f")
    assert manifest["compression"]["flops_ratio"] >= 2.0


def test_cli_bad_source_exits_2(tmp_path: Path, capsys) -> None:
    assert cli_main(["compress", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--ratio", "2"]) == 2
    assert "error:" in capsys.readouterr().err


def test_distillation_is_recorded_and_validated(robust_digits_dir: Path, tmp_path: Path) -> None:
    config = {**TINY, "finetune_epochs": 1, "distill": 0.5, "eval_dense": False}
    manifest = run_compress(robust_digits_dir, tmp_path / "d", ratio=3.0, method="prune", config=config,
                            progress=False)
    assert manifest["config"]["distill"] == 0.5
    assert manifest["compression"]["params_ratio"] >= 3.0
    assert 0.0 <= manifest["metrics"]["robust_acc"] <= manifest["metrics"]["clean_acc"] <= 1.0
    before = manifest["before_finetune"]  # the pruned model before fine-tuning, on the validation split
    assert 0.0 <= before["val_robust"] <= before["val_clean"] <= 1.0
    with pytest.raises(CstarError, match="--distill"):
        CompressConfig(distill=1.5).validate()


def test_frobenius_decay_is_recorded_and_validated(robust_digits_dir: Path, tmp_path: Path) -> None:
    from cstar import compress, train

    assert CompressConfig().factor_decay == "factors"
    assert compress.FACTOR_DECAYS == train.FACTOR_DECAYS  # the torch-free copy matches
    manifest = run_compress(robust_digits_dir, tmp_path / "c", ratio=3.0, method="cstar",
                            config={**TINY, "eval_dense": False, "factor_decay": "frobenius"}, progress=False)
    assert manifest["config"]["factor_decay"] == "frobenius"
    assert manifest["compression"]["params_ratio"] >= 3.0
    with pytest.raises(CstarError, match="--factor-decay"):
        CompressConfig(factor_decay="nuclear").validate()
