"""Progress output: tqdm bars only on a terminal; in a log, exactly one line per epoch."""

from __future__ import annotations

import contextlib
import io
import re

import torch
from torch import nn
from torch.utils.data import TensorDataset

from cstar.train import TrainConfig, fit, progress_bars

EPOCHS = 3
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): loss \d+\.\d+, val clean \d\.\d+ robust \d\.\d+ \(\d+\.\ds, \d+ img/s\)$")


class _Terminal(io.StringIO):
    """A stream that says it is a terminal (what tqdm sees when a person watches)."""

    def isatty(self) -> bool:
        return True


def _tiny_fit(stderr: io.StringIO, progress: bool = True) -> str:
    """Three epochs of a linear model on 64 random 1x8x8 images (8 batches each); returns stdout."""
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    val = TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    cfg = TrainConfig(epochs=EPOCHS, batch_size=8, lr=0.01, eps=0.05, train_steps=1, val_steps=1, val_limit=16,
                      device="cpu")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        fit(model, data, val, cfg, progress=progress)
    return stdout.getvalue()


def test_progress_bars_need_a_terminal_and_the_flag() -> None:
    with contextlib.redirect_stderr(io.StringIO()):
        assert progress_bars(True) is False
    with contextlib.redirect_stderr(_Terminal()):
        assert progress_bars(True) is True
        assert progress_bars(False) is False


def test_log_gets_one_line_per_epoch_and_no_carriage_returns() -> None:
    stderr = io.StringIO()
    stdout = _tiny_fit(stderr)
    assert "\r" not in stderr.getvalue() and "\r" not in stdout
    lines = stdout.splitlines()
    assert len(lines) == EPOCHS, lines
    for number, line in enumerate(lines, start=1):
        match = EPOCH_LINE.match(line)
        assert match is not None, line
        assert (int(match[1]), int(match[2])) == (number, EPOCHS)


def test_terminal_gets_bars_and_quiet_gets_nothing() -> None:
    terminal = _Terminal()
    stdout = _tiny_fit(terminal)
    assert terminal.getvalue().count("\r") >= EPOCHS  # tqdm frames, one bar per epoch at least
    assert len(stdout.splitlines()) == EPOCHS
    quiet = _Terminal()
    assert _tiny_fit(quiet, progress=False) == "" and quiet.getvalue() == ""
