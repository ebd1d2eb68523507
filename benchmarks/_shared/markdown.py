"""Markdown output: tables built from cells, and a finished table printed and appended to
the file given as ``--out``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def md_cell(text: str) -> str:
    """``text`` safe inside a table cell: pipes escaped, newlines as spaces."""
    return text.replace("|", "\\|").replace("\n", " ")


def md_row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(header: Sequence[str], rows: Iterable[Iterable[object]], align: str) -> list[str]:
    """The lines of a table: ``header``, the rule under it (``align``: one letter per
    column, ``l`` for ``---``, ``r`` for ``---:``), one line per row of cells."""
    if len(align) != len(header):
        raise ValueError(f"align {align!r} does not have one letter per column of {list(header)}")
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    return [md_row(header), rule, *(md_row(cells) for cells in rows)]


def emit(text: str, out: str | None) -> str:
    """Print a result table and append it to ``out`` (a markdown file) when given."""
    print(text)
    if out:
        with open(out, "a") as f:
            f.write("\n" + text)
    return text
