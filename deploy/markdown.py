"""The one Markdown table writer of reports and benchmark results (GitHub-flavoured, `|` escaped)."""

from __future__ import annotations

from collections.abc import Sequence


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table of preformatted string cells, without a trailing newline."""
    def escaped(cell: str) -> str:
        return cell.replace("\\|", "|").replace("|", "\\|")

    lines = ["| " + " | ".join(escaped(str(h)) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(escaped(str(c)) for c in row) + " |" for row in rows]
    return "\n".join(lines)
