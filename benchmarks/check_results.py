"""Check that every published benchmark result says how to reproduce it.

Every `NAME.json` under benchmarks/results/ (quick/ and archive/ excepted) must record the command as
run, the commit, the machine and the library versions, come from a clean tree (`git.dirty` false),
have its `NAME.md` beside it, and name a commit that is an ancestor of HEAD (`git merge-base
--is-ancestor`: the code that made it is in this history). Without git history the ancestry part is
skipped, with the reason printed. Exit status 1 when any file fails.

    python benchmarks/check_results.py [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
SKIPPED_FOLDERS = ("quick", "archive")
REQUIRED = ("command", "git.commit", "machine", "versions")


@dataclass
class Report:
    """Problems per result file, and checks skipped with their reason."""

    problems: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def result_files(results: Path) -> list[Path]:
    """Every result JSON under `results`, outside quick/ and archive/ folders."""
    return sorted(p for p in results.rglob("*.json")
                  if not any(part in SKIPPED_FOLDERS for part in p.relative_to(results).parts[:-1]))


def _lookup(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=False)


def history_reason(repo: Path) -> str | None:
    """None when `repo` has git history to check ancestry against, else why not."""
    try:
        head = _git(repo, "rev-parse", "--verify", "HEAD")
    except (OSError, subprocess.SubprocessError) as exc:
        return f"git is not usable here ({exc})"
    if head.returncode != 0:
        return f"no git history at {repo} ({head.stderr.strip() or 'git rev-parse HEAD failed'})"
    shallow = _git(repo, "rev-parse", "--is-shallow-repository").stdout.strip()
    return "the clone is shallow (older commits are missing)" if shallow == "true" else None


def is_ancestor(repo: Path, commit: str) -> bool:
    """Whether `commit` is HEAD or one of its ancestors (an unknown commit is not)."""
    return _git(repo, "merge-base", "--is-ancestor", commit, "HEAD").returncode == 0


def file_problems(path: Path, repo: Path, check_ancestry: bool) -> list[str]:
    """What one result file lacks."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return [f"not readable JSON ({exc})"]
    if not isinstance(record, dict):
        return ["not a JSON object"]
    problems = [f"no {key}" for key in REQUIRED if not _lookup(record, key)]
    dirty = _lookup(record, "git.dirty")
    if dirty is not False:
        problems.append("made from a dirty working tree" if dirty else "no git.dirty flag")
    commit = _lookup(record, "git.commit")
    if check_ancestry and commit and not is_ancestor(repo, str(commit)):
        problems.append(f"commit {str(commit)[:12]} is not an ancestor of HEAD")
    if not path.with_suffix(".md").is_file():
        problems.append(f"no {path.with_suffix('.md').name} beside it")
    return problems


def check(results: Path = RESULTS_DIR, repo: Path = REPO_ROOT) -> Report:
    """Check every result file under `results` against the git history of `repo`."""
    report = Report()
    reason = history_reason(repo)
    if reason is not None:
        report.skipped.append(f"ancestry of the recorded commits not checked: {reason}")
    for path in result_files(results):
        name = str(path.relative_to(results))
        report.checked.append(name)
        problems = file_problems(path, repo, reason is None)
        if problems:
            report.problems[name] = problems
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry: print the problems; exit 1 if any."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS_DIR), help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    report = check(Path(args.results))
    for line in report.skipped:
        print(f"skipped: {line}")
    for name, problems in report.problems.items():
        print(f"FAIL {name}: {'; '.join(problems)}")
    print(f"{len(report.checked)} result file(s) checked, {len(report.problems)} failing")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
