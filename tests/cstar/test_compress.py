"""`cstar compress` end to end on the robust digits fixture (tiny epoch budgets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import cstar.checkpoint as checkpoint
from cstar.checkpoint import load_checkpoint, set_submodule
from cstar.cli import main as cli_main
from cstar.compress import CompressConfig, run_compress
from cstar.data import load_dataset, to_tensors
from cstar.errors import CstarError
from cstar.flops import count_params
from cstar.lowrank import LowRankConv2d, LowRankLinear

TINY = {"admm_epochs": 1, "finetune_epochs": 1, "train_steps": 2, "eval_suite": "apgd", "eval_steps": 3,
        "eval_limit": 60, "realloc_epochs": 1}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    images, _ = to_tensors(load_dataset("digits").test, limit=32)
    with torch.no_grad():
        return model.eval()(images)


def _spy_on_save(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.nn.Module]:
    """Capture the in-memory model `run_compress` hands to save_checkpoint."""
    saved: dict[str, torch.nn.Module] = {}
    original = checkpoint.save_checkpoint

    def spy(out_dir, model, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved["model"] = model
        return original(out_dir, model, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", spy)
    return saved


def rebuild_from_rank_map(dense_dir: Path, out_dir: Path, manifest: dict) -> torch.nn.Module:
    """The dense architecture with each layer swapped as the manifest's rank map says (tucker2/svd ranks,
    tucker2 at its kept `channels` after pruning, pruned channel counts; BatchNorm sizes from the weights), loaded with the saved weights. Independent of
    the manifest's `structure`, which load_checkpoint uses."""
    model, _ = load_checkpoint(dense_dir)
    state = load_file(str(out_dir / manifest["weights"]["file"]))
    modules = dict(model.named_modules())
    for name, entry in manifest["ranks"].items():
        layer, kind, ranks = modules[name], entry["kind"], entry["ranks"]
        assert entry["shape"] == list(layer.weight.shape), name
        bias = layer.bias is not None
        if kind == "tucker2":  # at the kept `channels` where the layer was pruned first (hybrid)
            out_ch, in_ch = entry.get("channels", entry["shape"][:2])
            new: nn.Module = LowRankConv2d(in_ch, out_ch, layer.kernel_size, tuple(ranks), layer.stride,
                                           layer.padding, layer.dilation, bias, init=False)
        elif kind == "svd":
            new = LowRankLinear(layer.in_features, layer.out_features, ranks[0], bias, init=False)
        elif kind == "pruned" and isinstance(layer, nn.Conv2d):
            new = nn.Conv2d(ranks[1], ranks[0], layer.kernel_size, layer.stride, layer.padding,
                            layer.dilation, bias=bias)
        elif kind == "pruned":
            new = nn.Linear(ranks[1], ranks[0], bias)
        else:
            assert kind == "dense" and ranks == entry["shape"][:2], (name, entry)
            continue
        set_submodule(model, name, new)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.BatchNorm2d) and state[f"{name}.weight"].shape[0] != module.num_features:
            set_submodule(model, name, nn.BatchNorm2d(state[f"{name}.weight"].shape[0]))
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("method", ["cstar", "prune", "lowrank-uniform"])
def test_compress_round_trip(method: str, robust_digits_dir: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    saved = _spy_on_save(monkeypatch)
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
    # the saved model computes what compress produced in memory, and so does the model the rank map describes
    rebuilt = rebuild_from_rank_map(robust_digits_dir, tmp_path / method, loaded)
    expected = _logits(saved["model"])
    tolerance = 1e-5 * float(expected.abs().max())
    for candidate in (model, rebuilt):
        assert float((_logits(candidate) - expected).abs().max()) <= tolerance
    assert count_params(rebuilt) == count_params(model) == manifest["compression"]["params"]
    assert manifest["compression"]["dense_params"] / count_params(rebuilt) >= 3.0


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
                     "--train-steps", "1", "--eval-suite", "apgd", "--eval-steps", "2", "--eval-limit", "40", "--quiet"])
    assert code == 0
    assert "flops x" in capsys.readouterr().out
    _, manifest = load_checkpoint(tmp_path / "f")
    assert manifest["compression"]["flops_ratio"] >= 2.0


def test_cli_bad_source_exits_2(tmp_path: Path, capsys) -> None:
    assert cli_main(["compress", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--ratio", "2"]) == 2
    assert "error:" in capsys.readouterr().err


def test_distillation_trains_on_the_mix_with_the_dense_teacher(robust_digits_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--distill 0.5: every training step's loss is 0.5 CE + 0.5 KL(dense teacher || student) on its PGD
    batch, differs measurably from the CE alone, and is the loss fine-tuning reports (the one it optimized)."""
    from cstar.train import Teacher

    calls: list[tuple[float, torch.Tensor, torch.Tensor, float]] = []
    original = Teacher.mix

    def spy(self: Teacher, loss: torch.Tensor, student_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mixed = original(self, loss, student_logits, x)
        calls.append((float(loss.detach()), student_logits.detach().clone(), x.detach().clone(),
                      float(mixed.detach())))
        return mixed

    monkeypatch.setattr(Teacher, "mix", spy)
    config = {**TINY, "finetune_epochs": 1, "distill": 0.5, "eval_dense": False}
    manifest = run_compress(robust_digits_dir, tmp_path / "d", ratio=3.0, method="prune", config=config,
                            progress=False)
    assert manifest["config"]["distill"] == 0.5
    history = manifest["history"]["finetune"]
    assert len(history) == 2 and calls and len(calls) % 2 == 0  # prune fine-tunes admm + finetune epochs
    dense, _ = load_checkpoint(robust_digits_dir)  # the teacher, loaded independently
    for ce, student, x, mixed in calls:
        with torch.no_grad():
            kl = F.kl_div(student.log_softmax(1), dense(x).softmax(1), reduction="batchmean")
        assert mixed == pytest.approx(0.5 * ce + 0.5 * float(kl), rel=1e-5, abs=1e-6)
    gaps = torch.tensor([abs(mixed - ce) for ce, _, _, mixed in calls])
    assert float(gaps.mean()) > 0.05  # the teacher term is no rounding error
    first_epoch = calls[: len(calls) // 2]
    sizes = torch.tensor([float(student.shape[0]) for _, student, _, _ in first_epoch])
    reported = float((torch.tensor([m for *_, m in first_epoch]) * sizes).sum() / sizes.sum())
    assert history[0]["loss"] == pytest.approx(reported, rel=1e-5)
    assert manifest["compression"]["params_ratio"] >= 3.0
    assert 0.0 <= manifest["metrics"]["robust_acc"] <= manifest["metrics"]["clean_acc"] <= 1.0
    before = manifest["before_finetune"]  # the pruned model before fine-tuning, on the validation split
    assert 0.0 <= before["val_robust"] <= before["val_clean"] <= 1.0
    with pytest.raises(CstarError, match="--distill"):
        CompressConfig(distill=1.5).validate()


def test_frobenius_decay_reaches_the_fine_tuning(robust_digits_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--factor-decay frobenius: fine-tuning's optimizer gives the factors no L2 decay (the rest keeps it),
    and every fine-tuning epoch adds wd/2 sum ||W||_F^2 of the factorized layers to the loss.
    (tests/cstar/test_train.py checks the resulting one-step update exactly.)"""
    from cstar import compress, distributed, train

    assert CompressConfig().factor_decay == "factors"
    assert compress.FACTOR_DECAYS is train.FACTOR_DECAYS  # one source (cstar.config)
    optimizers: list[tuple[torch.nn.Module, train.TrainConfig, torch.optim.Optimizer]] = []
    penalties: list[tuple[float | None, float]] = []
    make_optimizer, train_epoch = train.make_optimizer, train.train_epoch

    def spy_optimizer(model: torch.nn.Module, cfg: train.TrainConfig) -> torch.optim.Optimizer:
        optimizer = make_optimizer(model, cfg)
        optimizers.append((model, cfg, optimizer))
        return optimizer

    def spy_epoch(model, loader, optimizer, cfg, scheduler=None, extra_loss=None,  # type: ignore[no-untyped-def]
                  **kwargs):
        layers = train.factorized_layers(distributed.unwrap(model))
        if layers:  # fine-tuning (ADMM trains the dense model)
            with torch.no_grad():
                squares = sum(float(layer.dense_weight().pow(2).sum()) for layer in layers)
                expected = 0.5 * cfg.weight_decay * squares
                penalties.append((None if extra_loss is None else float(extra_loss()), expected))
        return train_epoch(model, loader, optimizer, cfg, scheduler, extra_loss, **kwargs)

    from cstar.train import loop

    for module in (train, loop):  # the ADMM W-step reads them from cstar.train, fit from its own module
        monkeypatch.setattr(module, "make_optimizer", spy_optimizer)
        monkeypatch.setattr(module, "train_epoch", spy_epoch)
    manifest = run_compress(robust_digits_dir, tmp_path / "c", ratio=3.0, method="cstar",
                            config={**TINY, "eval_dense": False, "factor_decay": "frobenius"}, progress=False)
    assert manifest["config"]["factor_decay"] == "frobenius"
    finetune = [(model, cfg, opt) for model, cfg, opt in optimizers if train.factorized_layers(model)]
    assert len(finetune) == 1
    model, cfg, optimizer = finetune[0]
    assert cfg.factor_decay == "frobenius" and cfg.weight_decay == CompressConfig().weight_decay > 0
    factors = {id(p) for layer in train.factorized_layers(model)
               for name, p in layer.named_parameters(recurse=False) if name != "bias"}
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert len(decay) == sum(1 for _ in model.parameters()) and factors <= set(decay)
    assert all(decay[i] == 0.0 for i in factors)
    assert all(w == cfg.weight_decay for i, w in decay.items() if i not in factors)
    assert len(penalties) == TINY["finetune_epochs"]
    for got, expected in penalties:
        assert expected > 0 and got == pytest.approx(expected, rel=1e-5)
    assert manifest["compression"]["params_ratio"] >= 3.0
    with pytest.raises(CstarError, match="--factor-decay"):
        CompressConfig(factor_decay="nuclear").validate()
