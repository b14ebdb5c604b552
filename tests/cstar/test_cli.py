"""CLI: every documented subcommand is registered, help is fast, unknown commands are clear."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cstar.cli import COMMANDS, main

DOCUMENTED = ("train", "compress", "export", "calibrate", "build", "attackset", "verify", "bench", "predict",
              "pipeline")


def test_every_documented_command_is_registered() -> None:
    assert set(DOCUMENTED) <= set(COMMANDS)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_each_subcommand_has_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert "--" in capsys.readouterr().out


def test_unknown_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err


def test_top_level_help_does_not_import_torch() -> None:
    code = "import sys; from cstar.cli import main; main(['--help']) if False else None; " \
           "import cstar.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_thread_limit_from_environment() -> None:
    """CSTAR_THREADS caps torch's threads; a bad value is a clear error naming the variable."""
    import torch

    from cstar.cli import apply_thread_limit
    from cstar.errors import CstarError

    before = torch.get_num_threads()
    try:
        assert apply_thread_limit({"CSTAR_THREADS": "1"}) == 1
        assert torch.get_num_threads() == 1
        assert apply_thread_limit({}) is None
        with pytest.raises(CstarError, match="CSTAR_THREADS"):
            apply_thread_limit({"CSTAR_THREADS": "two"})
        with pytest.raises(CstarError, match="positive integer"):
            apply_thread_limit({"CSTAR_THREADS": "0"})
    finally:
        torch.set_num_threads(before)


def test_bad_thread_limit_is_one_error_line(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from cstar.cli import main

    monkeypatch.setenv("CSTAR_THREADS", "-3")
    assert main(["train", "--data", "digits", "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert "CSTAR_THREADS" in err and "fix:" in err and "Traceback" not in err
