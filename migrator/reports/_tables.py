"""Plain-text and Markdown tables: the one renderer every report uses.

Both take a header row and string cells.  The first column is a label
(left-aligned), the others are figures (right-aligned); Markdown cells are
escaped so a ``|`` or a newline in a label cannot break the table.
"""

from __future__ import annotations

__all__ = ["md_cell", "md_table", "text_table"]


def md_cell(text: str) -> str:
    """One Markdown table cell: backslashes and pipes escaped, newlines folded."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, one string per line."""
    out = ["| " + " | ".join(md_cell(h) for h in headers) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return out


def text_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A fixed-width text table (label column left, figures right), one string per line."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
