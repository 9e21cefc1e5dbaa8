"""A model's Markdown brought to our page conventions (docs/rendering.md), for models that write their own flavour
(LightOnOCR: HTML tables, LaTeX math between dollars):

- an HTML table becomes a Markdown table (first row as header) when no cell spans, else an HTML ``<table>`` with
  only rowspan/colspan kept (what the text-layer route writes); a LaTeX ``tabular`` is read the same way
  (``&`` cells, ``\\\\`` rows, ``\\multicolumn``/``\\multirow`` spans, rules dropped);
- ``$$ ... $$`` becomes ``\\[ ... \\]`` and ``$ ... $`` becomes ``\\( ... \\)``; a dollar that opens or closes on a
  space is a price, not math (``$5 and $10`` stays as it is), and ``\\$`` stays a dollar;
- Markdown tables and everything else pass through; blank-line runs collapse to one.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

_HTML_TABLE = re.compile(r"<table\b.*?</table\s*>", re.S | re.I)
_TABULAR = re.compile(r"\\begin\{tabular\*?\}(?:\{[^{}]*\})*(.*?)\\end\{tabular\*?\}", re.S)
_DISPLAY = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$\w])\$(?=[^\s$])([^$\n]*?[^\s\\$])\$(?![\w$])")


def normalise_markdown(text: str) -> str:
    text = _HTML_TABLE.sub(lambda m: _grid(_HtmlCells.read(m.group(0))) or m.group(0), text)
    text = _TABULAR.sub(lambda m: _grid(_tabular_cells(m.group(1))) or m.group(0), text)
    text = _DISPLAY.sub(lambda m: "\n\\[ " + " ".join(m.group(1).split()) + " \\]\n", text)
    text = _INLINE.sub(lambda m: f"\\({m.group(1)}\\)", text)
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def place(rows: list[list[tuple[str, int, int]]]) -> list[tuple[int, int, int, int, str]]:
    """Rows of (text, rowspan, colspan) cells placed on a grid: (row, column, rowspan, colspan, text), a cell
    skipping the columns that spans from rows above take."""
    taken: set[tuple[int, int]] = set()
    placed = []
    for r, row in enumerate(r for r in rows if r):
        c = 0
        for text, rowspan, colspan in row:
            while (r, c) in taken:
                c += 1
            placed.append((r, c, rowspan, colspan, " ".join(text.split())))
            taken |= {(r + i, c + j) for i in range(rowspan) for j in range(colspan)}
            c += colspan
    return placed


def table_cells(table: str) -> list[tuple[int, int, int, int, str]]:
    """One of our tables (a Markdown table, or an HTML one) back into placed cells."""
    if table.lstrip().startswith("<"):
        return place(_HtmlCells.read(table))
    lines = [line.strip() for line in table.splitlines() if line.strip().startswith("|")]
    rows = [[(cell.replace("\\|", "|").strip(), 1, 1) for cell in re.split(r"(?<!\\)\|", line.strip("|"))]
            for line in lines if not re.fullmatch(r"\|?(\s*:?-{3,}:?\s*\|)+\s*", line)]
    return place(rows)


def _grid(rows: list[list[tuple[str, int, int]]]) -> str:
    """Rows of (text, rowspan, colspan) cells as our table: placed on a grid and written by the text layer's own
    table writer (render/tables.py)."""
    from docpipe.render.tables import Cell, Table, table_markdown

    rows = [r for r in rows if r]
    if not rows:
        return ""
    placed = place(rows)
    cells = [Cell(r, c, rs, cs, text) for r, c, rs, cs, text in placed]
    width = max(c + cs for _, c, _, cs, _ in placed)
    return table_markdown(Table((0.0, 0.0, 0.0, 0.0), len(rows), width, cells))


class _HtmlCells(HTMLParser):
    """An HTML table's rows of (text, rowspan, colspan); markup inside a cell is reduced to its text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: list[list[tuple[str, int, int]]] = []
        self.cell: list | None = None

    @classmethod
    def read(cls, source: str) -> list[list[tuple[str, int, int]]]:
        parser = cls()
        parser.feed(source)
        parser.close()
        return parser.rows

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            if not self.rows:
                self.rows.append([])
            spans = dict(attrs)
            self.cell = [[], _span(spans.get("rowspan")), _span(spans.get("colspan"))]
        elif tag == "br" and self.cell is not None:
            self.cell[0].append(" ")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            text, rowspan, colspan = self.cell
            self.rows[-1].append(("".join(text), rowspan, colspan))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[0].append(data)


def _span(value) -> int:
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


def _tabular_cells(body: str) -> list[list[tuple[str, int, int]]]:
    body = re.sub(r"\\(hline|toprule|midrule|bottomrule)\b|\\cline\{[^}]*\}", "", body)
    rows = []
    for line in re.split(r"\\\\", body):
        if not line.strip():
            continue
        row = []
        for cell in re.split(r"(?<!\\)&", line):
            rowspan = colspan = 1
            m = re.fullmatch(r"\s*\\multicolumn\{(\d+)\}\{[^}]*\}\{(.*)\}\s*", cell, re.S)
            if m:
                colspan, cell = int(m.group(1)), m.group(2)
            m = re.fullmatch(r"\s*\\multirow\{(\d+)\}\{[^}]*\}\{(.*)\}\s*", cell, re.S)
            if m:
                rowspan, cell = int(m.group(1)), m.group(2)
            row.append((html.unescape(cell.replace("\\&", "&")).strip(), rowspan, colspan))
        rows.append(row)
    return rows
