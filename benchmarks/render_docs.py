"""Copy the result tables into docs/benchmarks.md, so the page never drifts from the result files.

docs/benchmarks.md marks each table block like this:

    <!-- results: compression_table_digits.md -->
    ...
    <!-- /results -->

and this script replaces what is between the markers with benchmarks/results/NAME.md (headings one
level deeper). `--check` changes nothing and exits 1 when a block differs from its file (a test
runs it), so after regenerating results run this script, then read the prose around the tables.

    python benchmarks/render_docs.py [--check] [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.\-]+\.md) -->\n)(?P<body>.*?)(<!-- /results -->)", re.DOTALL)


def rendered(name: str, results: Path = RESULTS_DIR) -> str:
    """The block body for result file `name`: its text, headings one level deeper."""
    text = (results / name).read_text(encoding="utf-8").strip()
    text = re.sub(r"\]\((?!https?:|/|\.\./)([\w.\-]+\.png)\)", r"](../benchmarks/results/\1)", text)  # plots beside
    return re.sub(r"^(#+) ", r"#\1 ", text, flags=re.MULTILINE) + "\n"


def render(doc_text: str, results: Path = RESULTS_DIR) -> tuple[str, list[str]]:
    """(the page with every block re-rendered, names of the blocks that changed)."""
    changed: list[str] = []

    def replace(match: re.Match[str]) -> str:
        body = rendered(match["name"], results)
        if body != match["body"]:
            changed.append(match["name"])
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, doc_text), changed


def blocks(doc_text: str) -> list[str]:
    """Names of the result files the page embeds."""
    return [match["name"] for match in BLOCK.finditer(doc_text)]


def main(argv: list[str] | None = None) -> int:
    """CLI entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a block differs from its result file")
    parser.add_argument("--doc", default=str(DOC), help="the page (default docs/benchmarks.md)")
    parser.add_argument("--results", default=str(RESULTS_DIR), help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    doc = Path(args.doc)
    text, changed = render(doc.read_text(encoding="utf-8"), Path(args.results))
    if args.check:
        for name in changed:
            print(f"out of date: the block of {name} in {doc}")
        return 1 if changed else 0
    if changed:
        from cstar.manifest import atomic_write_text

        atomic_write_text(doc, text)
    print(f"{len(blocks(text))} block(s), {len(changed)} updated: {', '.join(changed) or '-'}")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
