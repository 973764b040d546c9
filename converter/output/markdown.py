"""Markdown tables, as every report and card of the project writes them: a cell never breaks its row."""

from __future__ import annotations

from collections.abc import Iterable


def table_cell(value: object) -> str:
    """`value` as one table cell: a `|` inside it (a tolerance formula's |x|) would end the cell, and a
    line break the row, in GitHub's and the Hub's renderers; escaped, they are shown as written."""
    return str(value).replace("\\|", "|").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def table_row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(table_cell(cell) for cell in cells) + " |"
