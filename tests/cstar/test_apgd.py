"""APGD and the evaluation suites: known adversarial examples, bounds, a cross-check against torchattacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cstar.apgd import APGDConfig, apgd, apgd_targeted, checkpoint_periods, dlr_loss, dlr_targeted_loss
from cstar.checkpoint import load_checkpoint
from cstar.data import DataBundle, stratified_indices, to_tensors
from cstar.errors import CstarError
from cstar.robust_eval import SUITES, evaluate_suite, suite_settings

ATTACKS = {
    "apgd-ce": lambda m, x, y, eps, norm: apgd(m, x, y, eps, APGDConfig(norm=norm, n_iter=30)).x_adv,
    "apgd-dlr": lambda m, x, y, eps, norm: apgd(m, x, y, eps, APGDConfig(loss="dlr", norm=norm, n_iter=30)).x_adv,
    "apgd-t": lambda m, x, y, eps, norm: apgd_targeted(m, x, y, eps, APGDConfig(norm=norm, n_iter=30, n_targets=3)).x_adv,
}


def _linear_problem(norm: str, n: int = 300) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """A 10-class linear model on 4x4 inputs in [0.3, 0.7] and each input's exact minimal perturbation.

    For logits W x + b the smallest perturbation reaching class j is (z_y - z_j) / ||w_y - w_j||_*
    (dual norm: L1 for Linf, L2 for L2); eps stays small enough that the [0,1] box never binds.
    """
    torch.manual_seed(0)
    linear = nn.Linear(16, 10)
    model = nn.Sequential(nn.Flatten(), linear)
    x = 0.3 + 0.4 * torch.rand(n, 1, 4, 4)
    with torch.no_grad():
        logits = model(x)
        y = logits.argmax(1)
        weights = linear.weight
        dual = (weights[y][:, None, :] - weights[None, :, :]).norm(p=1 if norm == "linf" else 2, dim=2)
        distance = (logits.gather(1, y[:, None]) - logits) / dual.clamp_min(1e-12)
        distance[torch.arange(n), y] = float("inf")
        minimal = distance.min(1).values
    eps = min(float(minimal.median()), 0.25 if norm == "linf" else 0.6)
    return model, x, y, minimal, eps


def test_checkpoints_follow_the_papers_schedule() -> None:
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06))
    assert np.cumsum(checkpoint_periods(100)).tolist() == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoint_periods(10) == [2, 1, 1, 1, 1, 1, 1, 1, 1]


def test_dlr_losses_match_their_definitions() -> None:
    logits = torch.tensor([[5.0, 3.0, 1.0, 0.0], [1.0, 4.0, 2.0, 0.0]])
    y = torch.tensor([0, 0])
    # untargeted: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)
    assert torch.allclose(dlr_loss(logits, y), torch.tensor([-(5 - 3) / (5 - 1), -(1 - 4) / (4 - 1)]))
    # targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    target = torch.tensor([2, 2])
    assert torch.allclose(dlr_targeted_loss(logits, y, target), torch.tensor([-(5 - 1) / (5 - 0.5), -(1 - 2) / (4 - 0.5)]))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_finds_the_known_adversarial_examples_of_a_linear_model(norm: str) -> None:
    model, x, y, minimal, eps = _linear_problem(norm)
    vulnerable, robust = minimal < 0.9 * eps, minimal > eps
    assert vulnerable.sum() > 50 and robust.sum() > 50
    targeted = apgd_targeted(model, x, y, eps, APGDConfig(norm=norm))
    assert targeted.success[vulnerable].all()          # every point with a perturbation inside the ball
    assert not targeted.success[robust].any()          # none without one: the attack stayed in the ball
    untargeted = apgd(model, x, y, eps, APGDConfig(norm=norm))
    assert untargeted.success[minimal < 0.3 * eps].all()
    assert not untargeted.success[robust].any()
    suite = evaluate_suite(model, x, y, eps, norm, "apgd", suite_settings("apgd", n_iter=50))
    assert np.array_equal(suite.robust[(vulnerable | robust).numpy()], robust[vulnerable | robust].numpy())


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_stays_in_the_eps_ball_and_unit_box(name: str, norm: str) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.rand(24, 3, 8, 8)
    x[:8] = (x[:8] > 0.5).float()  # pixels on the box's faces: projection onto [0,1] must bind
    y = torch.randint(0, 10, (24,))
    eps = 0.1 if norm == "linf" else 1.0
    x_adv = ATTACKS[name](model, x, y, eps, norm)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-5)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(size.max()) > 0.5 * eps  # it moved


def test_attack_is_seeded_restores_train_mode_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(2)
    norm = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    model.train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    assert norm.running_mean is not None
    stats = norm.running_mean.clone()
    rng = torch.random.get_rng_state()
    first = apgd(model, x, y, 0.1, APGDConfig(n_iter=10, seed=3))
    second = apgd(model, x, y, 0.1, APGDConfig(n_iter=10, seed=3))
    other = apgd(model, x, y, 0.1, APGDConfig(n_iter=10, seed=4))
    assert model.training
    assert torch.equal(norm.running_mean, stats)   # ran in eval mode: BatchNorm statistics untouched
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.equal(first.x_adv, second.x_adv)
    assert not torch.equal(first.x_adv, other.x_adv)


def test_bad_suite_or_eps_is_a_user_error() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(CstarError, match="unknown evaluation suite") as bad:
        evaluate_suite(model, x, y, 0.1, suite="autoattack")
    assert bad.value.hint and all(name in bad.value.hint for name in SUITES)
    for eps in (-0.1, float("nan"), float("inf")):
        with pytest.raises(CstarError, match="eps must be a finite number") as error:
            evaluate_suite(model, x, y, eps, suite="apgd")
        assert error.value.hint
        with pytest.raises(CstarError, match="eps must be a finite number"):
            apgd(model, x, y, eps)


class _Rounded(nn.Module):
    """Logits of a linear model on inputs rounded to 1/4: zero gradient everywhere (masked), not robust."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((torch.round(x * 4) / 4).flatten(1))


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) + 0.1 * torch.randn(x.shape[0], 10)


def test_diagnostics_flag_gradient_masking_and_randomized_models() -> None:
    torch.manual_seed(5)
    masked = _Rounded()
    x = torch.rand(40, 1, 4, 4)
    with torch.no_grad():
        y = masked(x).argmax(1)
    result = evaluate_suite(masked, x, y, 0.3, suite="aa", settings=suite_settings("aa", n_iter=10, n_targets=2,
                                                                                   square_queries=200))
    square = result.attacks[-1]
    assert [a.name for a in result.attacks] == ["apgd-ce", "apgd-t", "square"]
    assert square.fooled > 0 and any("gradient masking" in w for w in result.warnings)
    noisy = evaluate_suite(_Noisy(), x, y, 0.1, suite="pgd20")
    assert any("randomized" in w for w in noisy.warnings)
    assert not any("randomized" in w for w in result.warnings)


def _digits_subset(robust_digits_dir: Path, digits: DataBundle, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model, _ = load_checkpoint(robust_digits_dir)
    x, y = to_tensors(digits.test, stratified_indices(digits.labels("test"), n, 0))
    return model.eval(), x, y


def test_suite_worst_case_is_below_pgd20_and_recorded(robust_digits_dir: Path, digits: DataBundle) -> None:
    model, x, y = _digits_subset(robust_digits_dir, digits, 100)
    result = evaluate_suite(model, x, y, 0.1, suite="aa", compare_pgd20=True,
                            settings=suite_settings("aa", n_iter=50, n_targets=3, square_queries=100))
    accs = [a.robust_acc for a in result.attacks]
    assert result.robust_acc == accs[-1] == int(result.robust.sum()) / 100
    assert accs == sorted(accs, reverse=True) and accs[0] <= result.clean_acc
    assert result.pgd20_robust_acc is not None and result.robust_acc < result.pgd20_robust_acc
    block = result.to_manifest()
    assert block["suite"] == "aa" and block["eps"] == 0.1 and block["norm"] == "linf"
    assert [a["name"] for a in block["attacks"]] == ["apgd-ce", "apgd-t", "square"]
    assert block["attacks"][0]["settings"]["n_iter"] == 50 and block["attacks"][2]["settings"]["n_queries"] == 100


def test_apgd_matches_torchattacks_on_a_trained_model(robust_digits_dir: Path, digits: DataBundle) -> None:
    """Same images, eps and 100 steps; APGD-T over the top-3 targets on both sides (torchattacks' n_classes=4
    means 3 targets) to keep the test's CPU time down; the standard 9 targets agree as well (see the report)."""
    torchattacks = pytest.importorskip("torchattacks", reason="the cross-check needs torchattacks (pip install 'cstar[dev]')")
    model, x, y = _digits_subset(robust_digits_dir, digits, 100)
    eps = 0.15

    def robust(x_adv: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(x_adv).argmax(1) == y).float().mean())

    ours_ce = apgd(model, x, y, eps, APGDConfig(n_iter=100)).robust_acc
    ours_t = apgd_targeted(model, x, y, eps, APGDConfig(loss="dlr-targeted", n_iter=100, n_targets=3)).robust_acc
    theirs_ce = robust(torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, loss="ce")(x, y))
    theirs_t = robust(torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_classes=4)(x, y))
    assert robust(x) - ours_ce > 0.2                 # the attack does something on this model
    assert ours_ce <= theirs_ce + 0.02
    assert ours_t <= theirs_t + 0.02
