"""Benchmark results say how to reproduce them: provenance in every result file, refusal of full results
from a dirty tree, the checker over benchmarks/results/, the archive's index, the docs built from them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import check_results, common, render_docs  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
ARCHIVE = RESULTS / "archive"


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit (README) and a results folder."""
    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    _git(tmp_path, "init", "-q", str(root))
    (root / "README").write_text("x")
    _git(root, "add", "README")
    _git(root, "commit", "-q", "-m", "one")
    return root


def _result(results: Path, name: str, **overrides: Any) -> Path:
    record: dict[str, Any] = {"command": "python benchmarks/x.py", "git": {"commit": None, "dirty": False},
                              "machine": {"cpu_model": "cpu"}, "versions": {"python": "3"}}
    record.update(overrides)
    path = results / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    path.with_suffix(".md").write_text("table\n")
    return path


# ------------------------------------------------------------------------------------------ checker


def test_checker_accepts_complete_results_and_names_every_problem(repo: Path) -> None:
    results = repo / "benchmarks" / "results"
    head = _git(repo, "rev-parse", "HEAD")
    _result(results, "good", git={"commit": head, "dirty": False})
    _result(results, "dirty", git={"commit": head, "dirty": True})
    _result(results, "bare", command=None, machine=None, versions=None, git={"dirty": False})
    _result(results, "foreign", git={"commit": "0" * 40, "dirty": False})
    _result(results, "nomd", git={"commit": head, "dirty": False}).with_suffix(".md").unlink()
    _result(results / "quick", "ignored", git=None)  # quick/ and archive/ are not checked
    _result(results / "archive", "ignored", git=None)
    report = check_results.check(results, repo)
    assert report.skipped == []
    assert sorted(report.checked) == ["bare.json", "dirty.json", "foreign.json", "good.json", "nomd.json"]
    assert "good.json" not in report.problems
    assert report.problems["dirty.json"] == ["made from a dirty working tree"]
    assert report.problems["bare.json"] == ["no command", "no git.commit", "no machine", "no versions"]
    assert report.problems["foreign.json"] == ["commit 000000000000 is not an ancestor of HEAD"]
    assert report.problems["nomd.json"] == ["no nomd.md beside it"]


def test_checker_rejects_a_commit_from_another_branch(repo: Path) -> None:
    results = repo / "benchmarks" / "results"
    _git(repo, "checkout", "-q", "-b", "side")
    (repo / "side").write_text("y")
    _git(repo, "add", "side")
    _git(repo, "commit", "-q", "-m", "side")
    side = _git(repo, "rev-parse", "HEAD")
    _git(repo, "checkout", "-q", "-")
    _result(results, "side", git={"commit": side, "dirty": False})
    assert check_results.check(results, repo).problems == {
        "side.json": [f"commit {side[:12]} is not an ancestor of HEAD"]}


def test_checker_without_git_history_skips_only_the_ancestry_part(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _result(results, "ok", git={"commit": "ab" * 20, "dirty": False})
    _result(results, "dirty", git={"commit": "ab" * 20, "dirty": True})
    report = check_results.check(results, tmp_path)
    assert len(report.skipped) == 1 and "no git history" in report.skipped[0]
    assert report.problems == {"dirty.json": ["made from a dirty working tree"]}


def test_published_results_have_provenance() -> None:
    """Every result file outside quick/ and archive/ was made by a recorded command at a clean commit of
    this history. (Fails until the results are regenerated from a clean commit: see docs/benchmarks.md,
    'The exact commands behind this page'.)"""
    report = check_results.check()
    assert report.checked, "no result files under benchmarks/results/"
    assert report.ok, "\n".join(f"{name}: {'; '.join(p)}" for name, p in report.problems.items())


# --------------------------------------------------------------------------------------- provenance


@pytest.fixture()
def fake_git(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace benchmarks.common.git_revision by a settable answer."""
    state: dict[str, Any] = {"commit": "c" * 40, "dirty": False, "changes": []}
    monkeypatch.setattr(common, "git_revision", lambda: dict(state))
    return state


def test_full_results_from_a_dirty_tree_are_refused(tmp_path: Path, fake_git: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(REPO / "benchmarks" / "x.py"), "--flag", "a b"])
    fake_git.update(dirty=True, changes=["cstar/x.py"])
    with pytest.raises(common.DirtyTreeError, match=r"uncommitted changes \(cstar/x.py\)") as info:
        common.write_results("x", {"rows": []}, "t", quick=False, directory=tmp_path)
    assert "--allow-dirty" in str(info.value.hint)
    assert not (tmp_path / "x.json").exists()
    common.write_results("x", {"rows": []}, "t", quick=True, directory=tmp_path)  # quick: allowed
    assert json.loads((tmp_path / "x.json").read_text())["git"]["dirty"] is True
    common.write_results("x", {"rows": []}, "t", quick=False, directory=tmp_path, allow_dirty=True)
    record = json.loads((tmp_path / "x.json").read_text())
    assert record["git"] == {"commit": "c" * 40, "dirty": True, "changes": ["cstar/x.py"]}
    assert record["command"] == "python benchmarks/x.py --flag 'a b'"
    assert record["machine"]["cpu_model"] and record["versions"]["python"]
    assert "Made by `python benchmarks/x.py --flag 'a b'` at commit cccccccccccc with uncommitted changes" in (
        tmp_path / "x.md").read_text()


def test_full_results_without_git_history_are_refused(tmp_path: Path, fake_git: dict[str, Any]) -> None:
    fake_git.update(commit=None, dirty=None)
    with pytest.raises(common.DirtyTreeError, match="no git history"):
        common.write_results("x", {}, "t", quick=False, directory=tmp_path)


def test_clean_full_results_pass_the_checker(tmp_path: Path, fake_git: dict[str, Any]) -> None:
    common.write_results("x", {"rows": []}, "t", quick=False, directory=tmp_path)
    record = json.loads((tmp_path / "x.json").read_text())
    assert record["git"]["dirty"] is False and record["command"].startswith("python ")
    assert check_results.file_problems(tmp_path / "x.json", tmp_path, check_ancestry=False) == []


def test_script_refuses_a_dirty_tree_before_any_work(fake_git: dict[str, Any],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    fake_git.update(dirty=True, changes=["a.py"])
    ran: list[bool] = []

    def add(parser: Any) -> None:
        common.add_common_arguments(parser)

    assert common.run_cli(None, add, lambda args: ran.append(True), None, []) == 2
    assert ran == [] and "error: the working tree has uncommitted changes" in capsys.readouterr().err
    assert common.run_cli(None, add, lambda args: ran.append(True), None, ["--allow-dirty"]) == 0
    assert common.run_cli(None, add, lambda args: ran.append(True), None, ["--quick"]) == 0
    assert ran == [True, True]


def test_dirty_flag_ignores_the_results_folder(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_all's later scripts must not find the tree dirty because an earlier one wrote its results."""
    monkeypatch.setattr(common, "REPO_ROOT", repo)
    monkeypatch.setattr(common, "RESULTS_DIR", repo / "benchmarks" / "results")
    head = _git(repo, "rev-parse", "HEAD")
    (repo / "benchmarks" / "results" / "new.json").write_text("{}")
    assert common.git_revision() == {"commit": head, "dirty": False, "changes": []}
    (repo / "README").write_text("changed")
    revision = common.git_revision()
    assert revision["dirty"] is True and revision["changes"] == ["README"]


# ------------------------------------------------------------------------------------ archive, docs


def test_archive_index_lists_every_archived_file() -> None:
    index = (ARCHIVE / "README.md").read_text(encoding="utf-8")
    rows = [line for line in index.splitlines() if line.startswith("| `")]
    listed = " ".join(row.split(" | ")[0] for row in rows)
    for path in ARCHIVE.iterdir():
        if path.name == "README.md":
            continue
        stem = path.name if path.is_dir() else path.stem
        assert f"`{stem}" in listed, f"{path.name} is archived but not in archive/README.md"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 4 and all(cells), f"incomplete archive row: {row}"


def test_docs_tables_are_the_result_files() -> None:
    """Every table block of docs/benchmarks.md equals its (non-archived) result file."""
    text = render_docs.DOC.read_text(encoding="utf-8")
    names = render_docs.blocks(text)
    assert {"compression_table_digits.md", "deploy_speed_digits.md", "training_overhead_digits.md",
            "export_robustness_digits.md", "seed_spread_digits.md"} <= set(names)
    assert all((RESULTS / name).is_file() for name in names)
    _, changed = render_docs.render(text)
    assert changed == [], f"run benchmarks/render_docs.py: {changed} differ from their result files"


def test_docs_name_only_existing_result_files() -> None:
    """docs/benchmarks.md names only non-archived result files; the archive page only archived ones."""
    pattern = re.compile(r"benchmarks/results/([\w\-/]+)\.(?:json|md|\{json,md\})")
    page = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for stem in pattern.findall(page):
        assert not stem.startswith("archive/") and (RESULTS / f"{stem}.json").is_file(), stem
    archive_page = (REPO / "docs" / "benchmarks-archive.md").read_text(encoding="utf-8")
    archived = [stem for stem in pattern.findall(archive_page) if "*" not in stem]
    assert archived and all(stem.startswith("archive/") for stem in archived)
    assert all((RESULTS / f"{stem}.json").is_file() for stem in archived)
    machine_path = re.search(r"(?<![\w.])/work/\S*", page + archive_page)  # e.g. /work/shared/data
    assert machine_path is None, f"{machine_path[0]}: use repository-relative paths such as ../shared/data"
