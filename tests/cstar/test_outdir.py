"""The one output-directory rule (cstar.outdir) and every stage's use of it.

Each stage is driven through the CLI with inputs it refuses before any long work, so the module stays
cheap; one real export shows --force replacing a directory of the same stage.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cstar.cli import main as cli_main
from cstar.errors import CstarError
from cstar.manifest import write_manifest
from cstar.outdir import OutputDir, artifact_stage, check_output, clean_stale, lock_path


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` (hidden ones included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fake_stage_dir(path: Path, stage: str, **body: object) -> Path:
    """A directory holding a finished `stage` manifest and one payload file."""
    path.mkdir(parents=True)
    (path / "payload.bin").write_bytes(b"payload of " + stage.encode())
    write_manifest(path, stage, dict(body))
    return path


def fake_export_dir(path: Path) -> Path:
    """Enough of an export directory for calibrate to reach its --out check."""
    return fake_stage_dir(path, "export", onnx={"file": "model.onnx", "sha256": "0" * 64},
                          dataset={"name": "digits"})


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """Run the CLI; assert exit 2 with one error line and one fix line (no traceback); return stderr."""
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-2].startswith("error: ") and lines[-1].startswith("  fix: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture()
def train_copy(robust_digits_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's train-stage directory (a refused write must not touch it)."""
    return Path(shutil.copytree(robust_digits_dir, tmp_path / "train"))


# ------------------------------------------------------------------------------- the rule itself


def test_refuses_another_stage_even_with_force(tmp_path: Path) -> None:
    other = fake_stage_dir(tmp_path / "t", "train")
    before = snapshot(other)
    for force in (False, True):
        with pytest.raises(CstarError, match="holds a finished 'train' artifact") as info:
            OutputDir(other, "export", force=force)
        assert "same stage" in str(info.value.hint)
    assert snapshot(other) == before


def test_same_stage_needs_force_and_force_replaces_only_when_complete(tmp_path: Path) -> None:
    out = fake_stage_dir(tmp_path / "e", "export", version=1)
    with pytest.raises(CstarError, match="already holds a finished export") as info:
        OutputDir(out, "export")
    assert "--force" in str(info.value.hint)
    with pytest.raises(RuntimeError), OutputDir(out, "export", force=True) as work:
        write_manifest(work, "export", {"version": 2})
        raise RuntimeError("crash before the end")
    assert (out / "payload.bin").is_file()  # the old directory is intact after a failed replacement
    with OutputDir(out, "export", force=True) as work:
        assert work != out and work.parent == out.parent
        write_manifest(work, "export", {"version": 2})
        assert (out / "payload.bin").is_file()  # still the old one while the new one is written
    assert not (out / "payload.bin").exists()
    assert artifact_stage(out) == "export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no temp, old copy or lock left


@pytest.mark.parametrize("relation", ["is", "contains", "is inside"])
def test_refuses_an_out_overlapping_an_input(tmp_path: Path, relation: str) -> None:
    source = tmp_path / "src" / "inner"
    source.mkdir(parents=True)
    out = {"is": source, "contains": tmp_path / "src", "is inside": source / "sub"}[relation]
    with pytest.raises(CstarError, match=f"--out .* {relation} the input"):
        check_output(out, "export", [source], force=True)


def test_refuses_user_data_but_accepts_an_empty_dir(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a cstar artifact")
    with pytest.raises(CstarError, match="not empty .*notes.txt"):
        check_output(mine, "compress", force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with OutputDir(empty, "export") as work:
        write_manifest(work, "export", {})
    assert artifact_stage(empty) == "export"


def test_a_second_writer_fails_while_the_lock_is_held(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock = lock_path(out)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a concurrent writer
        with pytest.raises(CstarError, match="another cstar process is writing") as info:
            OutputDir(out, "export").open()
        assert "another --out" in str(info.value.hint)
    finally:
        os.close(fd)
    assert not out.exists()
    claim = OutputDir(out, "export")
    work = claim.open()
    with pytest.raises(CstarError, match="another cstar process"):
        OutputDir(out, "export").open()  # our own open claim locks out a second one
    write_manifest(work, "export", {})
    claim.publish()
    assert artifact_stage(out) == "export" and not lock.exists()


def test_stale_temporaries_are_removed_and_an_interrupted_swap_is_restored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-999999-dead"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    with OutputDir(out, "export") as work:
        write_manifest(work, "export", {})
    assert not stale.exists()
    (out / ".export-abc").mkdir()  # what an older, SIGKILLed export left inside its directory
    os.rename(out, tmp_path / ".out.old-999999-dead")  # killed between the two renames of a --force swap
    assert [p.name for p in clean_stale(out)] == [".export-abc"]
    assert artifact_stage(out) == "export" and not (out / ".export-abc").exists()


def test_orphans_of_dead_writers_of_other_outputs_are_removed(tmp_path: Path) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid names no live process (a killed writer)
    dead = tmp_path / f".gone.tmp-{finished.pid}-dead"
    live = tmp_path / f".busy.tmp-{os.getpid()}-live"  # a writer that is still running
    for path in (dead, live):
        path.mkdir()
    with OutputDir(tmp_path / "out", "export") as work:
        write_manifest(work, "export", {})
    assert not dead.exists() and live.is_dir()


def test_an_unwritable_out_is_an_error_with_a_fix(train_copy: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CstarError, match="cannot write --out") as info:
        OutputDir(blocker / "out", "export").open()
    assert "directory you can write" in str(info.value.hint)
    refused(["compress", "--from", str(train_copy), "--out", str(blocker / "out"), "--ratio", "2", "--quiet"],
            capsys, "cannot write --out")


def test_a_read_only_parent_is_an_error_with_a_fix(tmp_path: Path) -> None:
    """A parent nobody may write: a chmod-500 folder, or (as root, who ignores modes) sysfs, read-only to root."""
    if os.geteuid() == 0:
        with pytest.raises(CstarError, match="cannot write --out") as info:
            OutputDir(Path("/sys") / f"cstar-test-{os.getpid()}", "export").open()
        assert "Permission denied" in info.value.message and "directory you can write" in str(info.value.hint)
        return
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(CstarError, match="cannot write --out"):
            OutputDir(parent / "out", "export").open()
    finally:
        parent.chmod(0o700)


# ------------------------------------------------------------------------------------ the stages


def test_compress_onto_its_own_input_is_refused_and_leaves_it_unchanged(
        train_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(train_copy)
    refused(["compress", "--from", str(train_copy), "--out", str(train_copy), "--ratio", "2", "--quiet"],
            capsys, "is the input")
    refused(["compress", "--from", str(train_copy), "--out", str(train_copy), "--ratio", "2", "--force"], capsys)
    assert snapshot(train_copy) == before


def test_compress_onto_another_train_dir_is_refused(train_copy: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    other = Path(shutil.copytree(train_copy, tmp_path / "other-train"))
    before = snapshot(other), snapshot(train_copy)
    refused(["compress", "--from", str(train_copy), "--out", str(other), "--ratio", "2", "--force"],
            capsys, "'train' artifact")
    assert (snapshot(other), snapshot(train_copy)) == before


@pytest.mark.parametrize("victim", ["train", "calibrate"])
def test_export_onto_a_train_or_calibrate_dir_is_refused(victim: str, train_copy: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    if victim == "train":  # another train directory than the input
        out = Path(shutil.copytree(train_copy, tmp_path / "victim"))
    else:
        out = fake_stage_dir(tmp_path / "cal", "calibrate")
    before = snapshot(out)
    refused(["export", "--from", str(train_copy), "--out", str(out), "--quiet", "--force"],
            capsys, f"'{victim}' artifact")
    assert snapshot(out) == before


def test_calibrate_onto_another_export_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, other = fake_export_dir(tmp_path / "e1"), fake_export_dir(tmp_path / "e2")
    before = snapshot(tmp_path)
    for extra in ([], ["--force"]):
        refused(["calibrate", "--from", str(source), "--data", "digits", "--samples", "8", "--out", str(other),
                 *extra], capsys, "export")
    assert snapshot(tmp_path) == before


def test_attackset_verify_build_and_pipeline_refuse_other_stages(train_copy: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    export = fake_export_dir(tmp_path / "exp")
    before = snapshot(tmp_path)
    refused(["attackset", "--reference", str(train_copy), "--data", "digits", "--out", str(export)], capsys,
            "'export' artifact")
    refused(["verify", "--artifact", str(train_copy), "--set", str(tmp_path / "none"), "--out", str(export)],
            capsys, "'export' artifact")
    refused(["build", "--from", str(export), "--out", str(train_copy), "--force"], capsys, "'train' artifact")
    refused(["pipeline", "--out", str(export)], capsys, "'export' artifact")
    refused(["train", "--out", str(export), "--epochs", "1"], capsys, "'export' artifact")
    assert snapshot(tmp_path) == before


def test_export_force_replaces_an_export_and_a_second_writer_fails(
        robust_digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export"
    argv = ["export", "--from", str(robust_digits_dir), "--out", str(out), "--quiet", "--simplifier", "none",
            "--parity-samples", "16"]
    assert cli_main(argv) == 0
    first = snapshot(out)
    refused(argv, capsys, "already holds a finished export", "--force")
    assert snapshot(out) == first
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused([*argv, "--force"], capsys, "another cstar process is writing")
    finally:
        os.close(fd)
    assert snapshot(out) == first
    stale = tmp_path / ".export.tmp-999999-dead"
    stale.mkdir()
    (out / "marker").write_text("from the old directory")
    assert cli_main([*argv, "--force"]) == 0
    assert not (out / "marker").exists() and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert artifact_stage(out) == "export" and (out / "model.onnx").is_file()


def test_profile_table_follows_the_file_rule(train_copy: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`cstar profile --out`: never into a stage directory or over user data; a table only with --force."""
    from cstar.outdir import check_output_file

    before = snapshot(train_copy)
    profile = ["profile", "--model-from", str(train_copy), "--backend", "ort-cpu", "--quiet"]
    refused([*profile, "--out", str(train_copy / "table.json")], capsys, "inside", "input")
    assert snapshot(train_copy) == before
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    refused([*profile, "--out", str(notes)], capsys, "already exists", "--force")
    refused([*profile, "--out", str(notes), "--force"], capsys, "not a cstar-latency-table", "not replaced")
    assert notes.read_text() == '{"mine": 1}'
    refused([*profile, "--out", str(tmp_path)], capsys, "is a directory")
    other = fake_stage_dir(tmp_path / "exported", "export")
    with pytest.raises(CstarError, match="inside a finished 'export' directory"):
        check_output_file(other / "table.json", (train_copy,))
    table = tmp_path / "table.json"
    table.write_text('{"kind": "cstar-latency-table"}')
    assert check_output_file(table, (train_copy,), force=True, kind="cstar-latency-table") == table.resolve()
