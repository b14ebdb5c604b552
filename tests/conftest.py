"""Shared fixtures: one small trained digits checkpoint per test session, plus hardware skip helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cstar.checkpoint import save_checkpoint
from cstar.cli import apply_thread_limit
from cstar.data import DataBundle, load_dataset, to_tensors
from cstar.models import build_model

# torch threads in the test process: $CSTAR_THREADS as the CLI reads it, else at most 2 (fewer when
# OMP_NUM_THREADS says so). Every test must pass with 1 and with 2.
if apply_thread_limit() is None:
    torch.set_num_threads(min(2, torch.get_num_threads()))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
requires_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None, reason="needs the tensorrt Python package (not installable here)"
)


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    """digits at 16x16 (the reference configuration)."""
    return load_dataset("digits")


def _quick_train(bundle: DataBundle, eps: float, epochs: int, seed: int) -> torch.nn.Module:
    """A few epochs of (FGSM-with-random-start) adversarial training: fast, robust enough for tests."""
    torch.manual_seed(seed)
    model = build_model("small-resnet", bundle.spec, width=8)
    images, labels = to_tensors(bundle.train)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(images.shape[0])
        for start in range(0, images.shape[0], 64):
            batch = order[start : start + 64]
            x, y = images[batch], labels[batch]
            if eps > 0:
                model.eval()
                delta = (torch.rand_like(x) * 2 - 1) * eps
                delta.requires_grad_(True)
                loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
                (grad,) = torch.autograd.grad(loss, delta)
                x = (x + (delta + 1.25 * eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1).detach()
            model.train()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def _save(bundle: DataBundle, model: torch.nn.Module, out: Path, eps: float) -> Path:
    images, labels = to_tensors(bundle.test)
    with torch.no_grad():
        clean_acc = float((model(images).argmax(1) == labels).float().mean())
    save_checkpoint(
        out, model, "train", "small-resnet", {"width": 8}, bundle.spec,
        {"eps": eps, "norm": "linf", "metrics": {"clean_acc": clean_acc}, "config": {"fixture": True}},
    )
    return out


@pytest.fixture(scope="session")
def robust_digits_dir(digits: DataBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train-stage directory: small-resnet (width 8), adversarially trained at eps 0.2 for a few epochs."""
    model = _quick_train(digits, eps=0.2, epochs=8, seed=0)
    return _save(digits, model, tmp_path_factory.mktemp("robust_digits"), eps=0.2)


@pytest.fixture(scope="session")
def standard_digits_dir(digits: DataBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train-stage directory: the same model trained without attacks (eps recorded as 0.2)."""
    model = _quick_train(digits, eps=0.0, epochs=6, seed=0)
    return _save(digits, model, tmp_path_factory.mktemp("standard_digits"), eps=0.2)
