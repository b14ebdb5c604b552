"""Adversarial training: learns, resumes to the same weights, validates its config, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cstar.cli import main as cli_main
from cstar.data import DataBundle, to_tensors
from cstar.errors import CstarError
from cstar.models import build_model
from cstar.train import TrainConfig, evaluate, fit, split_train_val


def _config(**overrides: object) -> TrainConfig:
    values: dict = {"epochs": 3, "batch_size": 64, "lr": 3e-3, "optimizer": "adam", "eps": 0.2, "train_steps": 2,
                    "val_steps": 3, "val_limit": 100, "device": "cpu"}
    values.update(overrides)
    return TrainConfig(**values)


def _small(bundle: DataBundle, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small-resnet", bundle.spec, width=8)


@pytest.mark.parametrize("method", ["pgd-at", "trades", "fgsm-rs", "n-fgsm"])
def test_training_beats_chance_and_records_history(digits: DataBundle, method: str) -> None:
    train, val = split_train_val(digits.train, 0.1, seed=0)
    result = fit(_small(digits), train, val, _config(method=method), progress=False)
    assert len(result.history) == 3 and 0 <= result.best_epoch < 3
    x, y = to_tensors(digits.test, limit=200)
    metrics = evaluate(result.model, x, y, eps=0.2, steps=5)
    assert metrics["clean_acc"] >= 0.5  # 10 classes: chance is 0.1
    assert metrics["robust_acc"] <= metrics["clean_acc"]


def test_resume_after_interruption_matches_uninterrupted_run(digits: DataBundle, tmp_path: Path) -> None:
    train, val = split_train_val(digits.train, 0.1, seed=0)
    cfg = _config(epochs=3, seed=1)
    torch.manual_seed(1)
    reference = fit(_small(digits, seed=1), train, val, cfg, progress=False, state_dir=tmp_path / "a")

    class Killed(RuntimeError):
        pass

    def crash(epoch: int, model: torch.nn.Module) -> None:
        if epoch == 1:
            raise Killed

    torch.manual_seed(1)
    with pytest.raises(Killed):
        fit(_small(digits, seed=1), train, val, cfg, progress=False, state_dir=tmp_path / "b", on_epoch_end=crash)
    torch.manual_seed(123)  # a different process state: resume must restore RNG itself
    resumed = fit(_small(digits, seed=99), train, val, cfg, progress=False, state_dir=tmp_path / "b")
    assert resumed.best_epoch == reference.best_epoch
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


@pytest.mark.parametrize("overrides,match", [({"epochs": 0}, "epochs"), ({"eps": -1.0}, "eps"),
                                             ({"method": "fgsm-magic"}, "method"), ({"optimizer": "lion"}, "optimizer"),
                                             ({"factor_decay": "nuclear"}, "factor decay"),
                                             ({"schedule": "wavy"}, "schedule"),
                                             ({"method": "fgsm-rs", "norm": "l2"}, "Linf")])
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(CstarError, match=match):
        _config(**overrides).validate()


def test_cli_train_writes_manifest_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    argv = ["train", "--data", "digits", "--width", "8", "--epochs", "1", "--train-steps", "1", "--eval-suite", "apgd",
            "--eval-steps", "2", "--eval-limit", "100", "--method", "n-fgsm", "--schedule", "cyclic", "--out", str(out)]
    assert cli_main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("schema_version", "stage", "inputs", "dataset", "model", "eps", "norm", "metrics", "params", "flops",
                "config", "versions"):
        assert key in manifest, key
    assert manifest["stage"] == "train" and manifest["eps"] == pytest.approx(0.2)
    assert manifest["metrics"]["n"] == 100 and manifest["config"]["method"] == "n-fgsm"  # --eval-limit: a subset
    assert set(manifest["metrics"]) >= {"clean_acc", "robust_acc", "attack"}
    attack = manifest["metrics"]["attack"]
    assert attack["suite"] == "apgd" and attack["iterations_overridden"] and manifest["schema_version"] == 2
    assert [a["name"] for a in attack["attacks"]] == ["apgd-ce", "apgd-t"]
    assert all(a["settings"]["n_iter"] == 2 for a in attack["attacks"])
    assert manifest["metrics"]["robust_acc"] == attack["attacks"][-1]["robust_acc"] <= attack["attacks"][0]["robust_acc"]
    assert cli_main(argv) == 2
    assert "already holds a finished run" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--data", "nope"], "unknown dataset"),
    (["--model", "nope"], "unknown model"),
    (["--eps", "-0.1"], "eps"),
    (["--data", "cifar10:/does/not/exist"], "/does/not/exist"),
])
def test_cli_train_bad_input_is_one_clear_error(argv: list[str], needle: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["train", *argv, "--epochs", "1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_teacher_mix_is_the_weighted_kl_and_zero_for_its_own_logits() -> None:
    from cstar.train import Teacher

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, loss = torch.rand(5, 4), torch.tensor(2.0)
    teacher = Teacher(net, weight=0.25)
    # the teacher's own logits: KL is 0, so the mix is (1 - w) * loss
    assert float(teacher.mix(loss, net(x), x)) == pytest.approx(0.75 * 2.0, abs=1e-6)
    student = torch.randn(5, 3)
    expected = torch.nn.functional.kl_div(student.log_softmax(1), net(x).softmax(1), reduction="batchmean")
    assert float(teacher.mix(loss, student, x)) == pytest.approx(0.75 * 2.0 + 0.25 * float(expected), rel=1e-5)
    assert float(Teacher(net, weight=0.0).mix(loss, student, x)) == 2.0
    assert not any(p.requires_grad for p in net.parameters())  # frozen: no gradient flows into the teacher
    with pytest.raises(CstarError, match="distillation weight"):
        Teacher(net, weight=1.5)
    with pytest.raises(CstarError, match="temperature"):
        Teacher(net, temperature=0.0)


def _factorized_net() -> torch.nn.Sequential:
    from cstar.lowrank import LowRankConv2d, LowRankLinear

    torch.manual_seed(0)
    return torch.nn.Sequential(LowRankConv2d(3, 6, (3, 3), (2, 2), padding=(1, 1)), torch.nn.BatchNorm2d(6),
                               torch.nn.Flatten(), LowRankLinear(6 * 4 * 4, 5, 2))


def test_frobenius_penalty_is_half_decay_times_squared_norm_of_the_represented_weights() -> None:
    from cstar.train import frobenius_penalty

    net = _factorized_net()
    penalty = frobenius_penalty(net, 1e-2)
    assert penalty is not None
    expected = 0.5 * 1e-2 * (net[0].dense_weight().pow(2).sum() + net[3].dense_weight().pow(2).sum())
    assert penalty().item() == pytest.approx(expected.item(), rel=1e-6)
    # gradient on U (LowRankLinear W = U V): d/dU [wd/2 ||U V||^2] = wd * U V V^T
    net.zero_grad()
    penalty().backward()
    u, v = net[3].u.detach(), net[3].v.detach()
    assert torch.allclose(net[3].u.grad, 1e-2 * u @ v @ v.T, atol=1e-7)
    assert frobenius_penalty(torch.nn.Sequential(torch.nn.Linear(3, 2)), 1e-2) is None  # nothing factorized
    assert frobenius_penalty(net, 0.0) is None


def test_frobenius_decay_moves_factor_decay_out_of_the_optimizer() -> None:
    from cstar.train import make_optimizer

    net = _factorized_net()
    factors = {id(p) for layer in (net[0], net[3]) for n, p in layer.named_parameters() if n != "bias"}
    plain = make_optimizer(net, _config(factor_decay="factors", weight_decay=1e-3))
    assert [g["weight_decay"] for g in plain.param_groups] == [1e-3]
    frob = make_optimizer(net, _config(factor_decay="frobenius", weight_decay=1e-3))
    decay = {id(p): g["weight_decay"] for g in frob.param_groups for p in g["params"]}
    assert len(decay) == sum(1 for _ in net.parameters())  # every parameter still trained
    assert all(decay[i] == 0.0 for i in factors)
    assert all(w == 1e-3 for i, w in decay.items() if i not in factors)  # BN, biases: plain decay


def _one_sgd_step(factor_decay: str, lr: float = 0.1, weight_decay: float = 0.05
                  ) -> tuple[torch.nn.Sequential, torch.nn.Sequential, torch.Tensor, torch.Tensor]:
    """(net before, net after) one step of `fit`: one full batch, plain SGD (no momentum), clean inputs."""
    import copy

    from torch.utils.data import TensorDataset

    net = _factorized_net()
    before = copy.deepcopy(net)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, 3, 4, 4, generator=generator), torch.arange(8) % 5
    cfg = _config(epochs=1, batch_size=8, optimizer="sgd", momentum=0.0, lr=lr, weight_decay=weight_decay,
                  eps=0.0, factor_decay=factor_decay)
    fit(net, TensorDataset(x, y), None, cfg, progress=False)
    return before, net, x, y


def test_frobenius_decay_one_step_update_is_the_predicted_one() -> None:
    """fit with factor_decay='frobenius': factors take the gradient of CE + wd/2 sum ||W||^2 and no L2 decay,
    other parameters take plain L2 decay; with 'factors' every parameter takes plain L2 decay."""
    from cstar.train import frobenius_penalty

    lr, wd = 0.1, 0.05
    before, plain, x, y = _one_sgd_step("factors", lr, wd)
    _, frob, _, _ = _one_sgd_step("frobenius", lr, wd)
    # gradients of the clean CE loss at the starting point, in train mode (batch statistics), by hand
    net = before.train()
    ce = dict(zip([n for n, _ in net.named_parameters()],
                  torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), list(net.parameters())),
                  strict=True))
    penalty = frobenius_penalty(net, wd)
    assert penalty is not None
    pen = dict(zip([n for n, _ in net.named_parameters()],
                   torch.autograd.grad(penalty(), list(net.parameters()), allow_unused=True), strict=True))
    factors = {f"{i}.{n}" for i in (0, 3) for n, _ in net[i].named_parameters() if n != "bias"}
    assert factors == {"0.u_in", "0.core", "0.u_out", "3.u", "3.v"}
    moved = 0.0
    params = {name: p.detach() for name, p in net.named_parameters()}
    for name, p in params.items():
        expected_plain = p - lr * (ce[name] + wd * p)
        assert torch.allclose(dict(plain.named_parameters())[name], expected_plain, atol=1e-6), name
        if name in factors:
            assert pen[name] is not None
            expected_frob = p - lr * (ce[name] + pen[name])
            moved = max(moved, float((expected_frob - expected_plain).abs().max()))
        else:
            expected_frob = expected_plain
        assert torch.allclose(dict(frob.named_parameters())[name], expected_frob, atol=1e-6), name
    assert moved > 1e-4  # the two decays differ measurably (well above the 1e-6 tolerance)


def test_cyclic_schedule_rises_to_the_lr_at_40_percent_and_falls_to_zero() -> None:
    from cstar.train import make_scheduler

    cfg = _config(epochs=10, schedule="cyclic", lr=0.2, optimizer="sgd")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.0) and max(lrs) == pytest.approx(0.2)
    assert lrs.index(max(lrs)) == 40 and lrs[-1] == pytest.approx(0.2 / 60, rel=1e-6)
