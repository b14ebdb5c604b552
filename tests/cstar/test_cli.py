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
