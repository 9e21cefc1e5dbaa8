"""Tables on a text-layer page: found (ruled, unruled, or by the layout analysis), filled with the page's words, and
written in our convention with each cell's header and row label kept.

A table is a grid of slots; a cell covers one or more (``Cell``). Writing it (``table_markdown``):

- The header is the first row, and every row below a header row that has a cell spanning columns (a group header
  such as "Year Ended" over three years has its years below it). A one-cell first row spanning the whole table is its
  title, written as a line above it. A table that goes on from the page before (it starts the page and its first row
  reads like the rows under it) has no header row of its own: an empty one is written, so no data row becomes one.
- Where only header cells span, it is a Markdown table whose column headers join the headers above them ("Year Ended
  2023"); an empty corner cell stays empty; a group row (one label, the rest of its row empty: "Operating expenses")
  stays a row. Where a body cell spans rows or columns it is an HTML ``<table>`` with ``rowspan``/``colspan`` and
  ``<th>`` header cells, since a Markdown table cannot say that a cell spans.
- A right-to-left table (most of its letters in such a script) is written from its rightmost column; each cell's
  words are in reading order, a right-to-left line's by their logical place (render/scripts.py).

Filling is linear in the words and slots: each word goes to its slot by bisection on the row and column edges.
"""

from __future__ import annotations

import bisect
import html
import re
import statistics
from dataclasses import dataclass, field

from docpipe.render.scripts import cell_text, mostly_right_to_left, visual_words

CELL_GAP_EM = 1.0  # words further apart than this (in font heights) sit in different table cells
TABLE_MIN_ROWS = 3
TABLE_MAX_WORDS_PER_CELL = 4.0  # on average: prose in two columns has far more per line
DENSE_SLOTS = 600  # a ruled grid with more slots than this is read from its rules, not by find_tables
SIDE_BY_SIDE_GAP = 2.0  # a column gutter this many times wider than the table's others (and MIN_APART) splits it
MIN_APART_PT = 36.0
PROSE_WORDS = 5  # a column whose cells average this many words may be a paragraph beside the table
NUMBER = re.compile(r"^[-+−(]?[$€£¥]?\s?\d[\d,.\s]*%?\)?(\s*\([-+−]?\d[\d,.]*%?\))?$")


@dataclass
class Cell:
    row: int
    col: int
    rowspan: int = 1
    colspan: int = 1
    text: str = ""


@dataclass
class Table:
    """A table found on the page: its box (page points), grid size and cells; ``extents``: per column, the x range
    its one-column cells' words take (None for an empty column), where known."""

    bbox: tuple[float, float, float, float]
    rows: int
    cols: int
    cells: list[Cell] = field(default_factory=list)
    extents: list[tuple[float, float] | None] = field(default_factory=list)
    sources: list[dict[int, set[int]]] = field(default_factory=list)  # per column: text block -> rows it fills


# --- characters and words ---------------------------------------------------------------------------------------


def is_cjk(ch: str) -> bool:
    """Han, kana, hangul and their punctuation: scripts written without spaces between words."""
    return "\u3000" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af" or "\uf900" <= ch <= "\ufaff" or \
        "\uff00" <= ch <= "\uffef" or "\U00020000" <= ch <= "\U0002fa1f"


def unspaced(ch: str) -> bool:
    """Han, kana and CJK punctuation: a line break between two of them is no space (Korean sets spaces between its
    words, so hangul is not here)."""
    return is_cjk(ch) and not "\uac00" <= ch <= "\ud7af"


def word_count(text: str) -> int:
    """Words as a reader counts them: a CJK character is a word (a CJK line has no spaces, and two columns of CJK
    prose must not pass for a table of one-word cells)."""
    return len(text.split()) + sum(1 for ch in text if is_cjk(ch)) - sum(1 for w in text.split() if all(map(is_cjk, w)))


# --- grids from edges -------------------------------------------------------------------------------------------


def edges(values: list[float], tol: float = 2.0) -> list[float]:
    out: list[float] = []
    for v in sorted(values):
        if not out or v - out[-1] > tol:
            out.append(v)
    return out


def _slot(edge_list: list[float], v: float) -> int:
    """The slot (between two edges) that holds v, clamped to the grid."""
    return min(max(bisect.bisect_right(edge_list, v) - 1, 0), len(edge_list) - 2)


def _nearest(edge_list: list[float], v: float) -> int:
    i = bisect.bisect_left(edge_list, v)
    if i == 0:
        return 0
    if i == len(edge_list):
        return len(edge_list) - 1
    return i if edge_list[i] - v < v - edge_list[i - 1] else i - 1


def fill(rows: list[float], cols: list[float], spans: list[tuple[int, int, int, int]], words: list,
         bbox=None) -> Table:
    """A grid from its row and column edges (page points) and its spanning cells (row0, row1, col0, col1, end
    exclusive), filled with the words whose centres fall in it: each word to its slot by bisection, each slot to
    the cell that covers it."""
    n_rows, n_cols = len(rows) - 1, len(cols) - 1
    owner: dict[tuple[int, int], Cell] = {}
    cells = []
    for r0, r1, c0, c1 in spans:
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, n_rows), min(c1, n_cols)
        if r1 <= r0 or c1 <= c0 or any((r, c) in owner for r in range(r0, r1) for c in range(c0, c1)):
            continue
        cell = Cell(r0, c0, r1 - r0, c1 - c0)
        cells.append(cell)
        for r in range(r0, r1):
            for c in range(c0, c1):
                owner[(r, c)] = cell
    for r in range(n_rows):
        for c in range(n_cols):
            if (r, c) not in owner:
                owner[(r, c)] = cell = Cell(r, c)
                cells.append(cell)
    texts: dict[int, list] = {}
    for w in words:
        x, y = (w[0] + w[2]) / 2, (w[1] + w[3]) / 2
        cell = owner[(_slot(rows, y), _slot(cols, x))]
        texts.setdefault(id(cell), []).append(w)
    extents: list[tuple[float, float] | None] = [None] * n_cols
    sources: list[dict[int, set[int]]] = [{} for _ in range(n_cols)]
    for cell in cells:
        ws = texts.get(id(cell), ())
        cell.text = cell_text(ws)  # row by row, a right-to-left row's words in logical order
        if ws and cell.colspan == 1:
            old = extents[cell.col]
            left, right = min(w[0] for w in ws), max(w[2] for w in ws)
            extents[cell.col] = (left, right) if old is None else (min(old[0], left), max(old[1], right))
            for w in ws:
                if len(w) > 5:  # extractWORDS: (x0, y0, x1, y1, text, block, line, word)
                    sources[cell.col].setdefault(w[5], set()).add(cell.row)
    cells.sort(key=lambda c: (c.row, c.col))
    return Table(tuple(bbox) if bbox else (cols[0], rows[0], cols[-1], rows[-1]), n_rows, n_cols, cells, extents,
                 sources)


def without_prose(table: Table) -> Table | None:
    """The table without a first or last column that is a paragraph beside it: wordy cells (PROSE_WORDS on
    average), from one text block running down three rows or more and into no other column (a table's cells are
    blocks of their own, or rows across it; a column of figures MuPDF made one block is not wordy). None when fewer
    than two columns are left."""
    def prose(c: int) -> bool:
        if c >= len(table.sources):
            return False
        texts = [cell.text for cell in table.cells if cell.col == c and cell.text]
        if not texts or sum(word_count(t) for t in texts) < PROSE_WORDS * len(texts):
            return False
        return any(len(rows) >= 3 and not any(block in other for other in table.sources[:c] + table.sources[c + 1:])
                   for block, rows in table.sources[c].items())

    first, last = 0, table.cols - 1
    while last > first and prose(last):
        last -= 1
    while first < last and prose(first):
        first += 1
    if (first, last) == (0, table.cols - 1):
        return table
    if last - first < 1 or any(c.col < first <= c.col + c.colspan - 1 or c.col <= last < c.col + c.colspan - 1
                               for c in table.cells):
        return None if last - first < 1 else table
    ext = table.extents
    cells = [Cell(c.row, c.col - first, c.rowspan, c.colspan, c.text) for c in table.cells if first <= c.col <= last]
    x0 = ext[first][0] if ext and ext[first] else table.bbox[0]
    x1 = ext[last][1] if ext and ext[last] else table.bbox[2]
    return Table((x0, table.bbox[1], x1, table.bbox[3]), table.rows, last - first + 1, cells,
                 ext[first:last + 1], table.sources[first:last + 1])


def apart_from_graphics(table: Table, graphics: list[tuple]) -> list[Table]:
    """The table cut where a graphic stands in a column gutter across its rows (a chart whose labels the analysis
    took for a column of the table beside it); a part of fewer than two columns is no table (its words go back to
    the page's text)."""
    ext = table.extents
    if table.cols < 2 or len(ext) != table.cols or any(e is None for e in ext):
        return [table]
    y0, y1 = table.bbox[1], table.bbox[3]
    cuts = [c for c in range(table.cols - 1) if any(
        ext[c][1] - 2 <= g[0] and g[2] <= ext[c + 1][0] + 2 and min(g[3], y1) - max(g[1], y0) > 0.3 * (y1 - y0)
        for g in graphics) and not any(cell.col <= c < cell.col + cell.colspan - 1 for cell in table.cells)]
    if not cuts:
        return [table]
    parts, start = [], 0
    for cut in cuts + [table.cols - 1]:
        if cut + 1 - start >= 2:
            cells = [Cell(c.row, c.col - start, c.rowspan, c.colspan, c.text) for c in table.cells
                     if start <= c.col <= cut]
            bbox = (ext[start][0], y0, ext[cut][1], y1)
            parts.append(Table(bbox, table.rows, cut + 1 - start, cells, ext[start:cut + 1],
                               table.sources[start:cut + 1]))
        start = cut + 1
    return parts


def side_by_side(table: Table) -> list[Table]:
    """The table, or the two tables it is where one column gutter is far wider than the others (SIDE_BY_SIDE_GAP
    times and MIN_APART_PT at least), each side has two columns or more, no cell spans the gutter, and the right
    side begins with a column of labels (not of figures: a wide gap before the figures is one table's)."""
    ext = table.extents
    if table.cols < 4 or len(ext) != table.cols or any(e is None for e in ext):
        return [table]
    gaps = [ext[c + 1][0] - ext[c][1] for c in range(table.cols - 1)]
    cut = max(range(1, table.cols - 2), key=lambda c: gaps[c], default=None)
    if cut is None:
        return [table]
    others = [g for c, g in enumerate(gaps) if c != cut]
    if gaps[cut] < max(MIN_APART_PT, SIDE_BY_SIDE_GAP * max(others)):
        return [table]
    if any(c.col <= cut < c.col + c.colspan - 1 for c in table.cells):
        return [table]
    labels = [c.text for c in table.cells if c.col == cut + 1 and c.row > 0 and c.text]
    if not labels or sum(_is_number(t) for t in labels) * 2 > len(labels):
        return [table]
    left = Table((table.bbox[0], table.bbox[1], (ext[cut][1] + ext[cut + 1][0]) / 2, table.bbox[3]), table.rows,
                 cut + 1, [c for c in table.cells if c.col <= cut], ext[:cut + 1], table.sources[:cut + 1])
    right_cells = [Cell(c.row, c.col - cut - 1, c.rowspan, c.colspan, c.text) for c in table.cells if c.col > cut]
    right = Table(((ext[cut][1] + ext[cut + 1][0]) / 2, table.bbox[1], table.bbox[2], table.bbox[3]), table.rows,
                  table.cols - cut - 1, right_cells, ext[cut + 1:], table.sources[cut + 1:])
    return [left, right]


def from_cell_boxes(boxes: list[tuple], words: list, bbox) -> Table:
    """A ruled table from its cells' boxes (find_tables): edges from the boxes, a box covering several slots a
    spanning cell. Linear in the words and cells."""
    xs = edges([c[0] for c in boxes] + [c[2] for c in boxes])
    ys = edges([c[1] for c in boxes] + [c[3] for c in boxes])
    spans = []
    for c in boxes:
        r0, r1 = _nearest(ys, c[1]), _nearest(ys, c[3])
        c0, c1 = _nearest(xs, c[0]), _nearest(xs, c[2])
        if r1 - r0 > 1 or c1 - c0 > 1:
            spans.append((r0, r1, c0, c1))
    return fill(ys, xs, spans, words, bbox)


# --- tables from rulings ----------------------------------------------------------------------------------------


def rules_area(log: list) -> tuple | None:
    """The box around the page's strokes and thin fills (what a ruled table is drawn with; ``log``: the page's
    get_bboxlog()), or None without any: the table finder reads only the text there (it builds a Python object per
    character, the bulk of its cost)."""
    boxes = _rules(log)
    if not boxes:
        return None
    return (min(b[0] for b in boxes) - 2, min(b[1] for b in boxes) - 2, max(b[2] for b in boxes) + 2,
            max(b[3] for b in boxes) + 2)


def _rules(log: list) -> list[tuple]:
    return [tuple(bbox) for kind, bbox in log if kind == "stroke-path"
            or (kind == "fill-path" and min(bbox[2] - bbox[0], bbox[3] - bbox[1]) <= 3)]


def ruled_tables(page, words: list, log: list) -> list[Table]:
    """Tables drawn with lines all round, from PyMuPDF's table finder without its layout model; a dense grid (a
    printed spreadsheet: more than DENSE_SLOTS slots between its rules) straight from its rules, since the
    finder's cost grows with the square of its rules' crossings (a 400 x 25 sheet took minutes)."""
    area = rules_area(log)
    if area is None:
        return []
    dense = _dense_grid(log, words)
    if dense is not None:
        return [dense]
    found = []
    for tab in page.find_tables(clip=area, strategy="lines", use_layout=False).tables:
        boxes = [c for c in tab.cells if c is not None]
        if tab.row_count < 2 or tab.col_count < 2 or not boxes:
            continue
        bbox = tuple(tab.bbox)  # a property that walks every cell: once
        found.append(from_cell_boxes(boxes, [w for w in words if inside(w, bbox)], bbox))
    return found


def _dense_grid(log: list, words: list) -> Table | None:
    """The page's rules as one grid (a rule's ends and a frame's edges), when it has more than DENSE_SLOTS slots;
    else None. Every slot a cell: a printed sheet's cells seldom span."""
    xs, ys = [], []
    for x0, y0, x1, y1 in _rules(log):
        if x1 - x0 > 3:
            ys += [y0, y1] if y1 - y0 > 3 else [(y0 + y1) / 2]
        if y1 - y0 > 3:
            xs += [x0, x1] if x1 - x0 > 3 else [(x0 + x1) / 2]
    xs, ys = edges(xs), edges(ys)
    if len(xs) < 3 or len(ys) < 3 or (len(xs) - 1) * (len(ys) - 1) <= DENSE_SLOTS:
        return None
    bbox = (xs[0], ys[0], xs[-1], ys[-1])
    table = fill(ys, xs, [], [w for w in words if inside(w, bbox)], bbox)
    return table


def horizontal_rules(log: list) -> list[tuple[float, float, float]]:
    """(y, x0, x1) of the page's horizontal strokes and hairline fills: what group headers are underlined with."""
    out = []
    for kind, b in log:
        if kind in ("stroke-path", "fill-path") and b[3] - b[1] <= 3 and b[2] - b[0] > 6:
            out.append(((b[1] + b[3]) / 2, b[0], b[2]))
    return out


def widen_group_headers(table: Table, rules: list, row_edges: list[float], col_edges: list[float]) -> None:
    """A header cell underlined by a rule covers the columns its rule covers (a group header centred over three
    years is often found over two), where those slots of its row are empty."""
    if not rules or table.rows < 2:
        return
    by_row: dict[int, list[Cell]] = {}
    for cell in table.cells:
        by_row.setdefault(cell.row, []).append(cell)
    for cell in [c for c in table.cells if c.row < table.rows - 1 and c.text and c.rowspan == 1]:
        bottom = row_edges[cell.row + 1]
        height = row_edges[cell.row + 1] - row_edges[cell.row]
        left, right = col_edges[cell.col], col_edges[cell.col + cell.colspan]
        for y, x0, x1 in rules:
            if abs(y - bottom) > height * 0.75 or x1 <= left or x0 >= right:
                continue
            covered = [c for c in range(len(col_edges) - 1)
                       if x0 - 2 <= (col_edges[c] + col_edges[c + 1]) / 2 <= x1 + 2]
            if not covered or (covered[0] >= cell.col and covered[-1] < cell.col + cell.colspan):
                continue
            c0, c1 = min(covered[0], cell.col), max(covered[-1] + 1, cell.col + cell.colspan)
            row = by_row[cell.row]
            others = [o for o in row if o is not cell and o.col < c1 and o.col + o.colspan > c0]
            if any(o.text or o.rowspan > 1 for o in others):
                continue
            for o in others:
                table.cells.remove(o)
                row.remove(o)
            cell.col, cell.colspan = c0, c1 - c0
            break


# --- unruled tables ---------------------------------------------------------------------------------------------


def unruled_tables(words: list) -> list[Table]:
    """Tables without lines: runs of at least TABLE_MIN_ROWS text rows that split, at gaps wider than
    CELL_GAP_EM, into the same number (2 or more) of short cells, each cell under the one above it. A run whose
    columns part at one gutter far wider than the others is two tables side by side."""
    rows = _rows(words)
    found, run = [], []
    for row in rows + [None]:
        cells = _cells(row) if row is not None else []
        if run and len(cells) == len(run[-1]) >= 2 and _aligned(run[-1], cells) and _close(run[-1], cells):
            run.append(cells)
            continue
        if len(run) >= TABLE_MIN_ROWS and _short(run):
            found += _side_by_side(run)
        run = [cells] if len(cells) >= 2 else []
    tables = []
    for run in found:
        n_cols = len(run[0])
        table = Table(union([c["bbox"] for cells in run for c in cells]), len(run), n_cols)
        # a cell's words were joined left to right: a right-to-left cell's put in logical order (scripts)
        table.cells = [Cell(r, c, text=visual_words(cells[c]["text"])) for r, cells in enumerate(run)
                       for c in range(n_cols)]
        tables.append(table)
    return tables


def _side_by_side(run: list[list[dict]]) -> list[list[list[dict]]]:
    """The run, or its two halves where one column gutter is far wider than the others."""
    n = len(run[0])
    if n < 4:
        return [run]
    gaps = [min(cells[c + 1]["bbox"][0] for cells in run) - max(cells[c]["bbox"][2] for cells in run)
            for c in range(n - 1)]
    widest = max(range(n - 1), key=lambda c: gaps[c])
    others = [g for c, g in enumerate(gaps) if c != widest]
    if 1 <= widest <= n - 3 and gaps[widest] >= max(MIN_APART_PT, SIDE_BY_SIDE_GAP * max(others)):
        return [[cells[:widest + 1] for cells in run], [cells[widest + 1:] for cells in run]]
    return [run]


def _rows(words: list) -> list[list]:
    """Words grouped into visual rows (centres within half a word's height), top to bottom."""
    rows: list[list] = []
    for w in sorted(words, key=lambda w: (w[1] + w[3]) / 2):
        yc, h = (w[1] + w[3]) / 2, w[3] - w[1]
        if rows and abs(yc - rows[-1][0]) < h / 2:
            rows[-1][1].append(w)
        else:
            rows.append([yc, [w]])
    return [sorted(ws, key=lambda w: w[0]) for _, ws in rows]


def _cells(row: list) -> list[dict]:
    cells: list[dict] = []
    for w in row:
        gap_limit = CELL_GAP_EM * (w[3] - w[1])
        if cells and w[0] - cells[-1]["bbox"][2] <= gap_limit:
            c = cells[-1]
            c["text"] += " " + w[4]
            c["words"] += word_count(w[4])
            c["bbox"] = union([c["bbox"], w[:4]])
        else:
            cells.append({"text": w[4], "words": word_count(w[4]), "bbox": tuple(w[:4])})
    return cells


def _aligned(above: list[dict], below: list[dict]) -> bool:
    return all(a["bbox"][0] < b["bbox"][2] and b["bbox"][0] < a["bbox"][2] for a, b in zip(above, below))


def _close(above: list[dict], below: list[dict]) -> bool:
    """Consecutive rows: the gap between them under two and a half row heights."""
    top = max(c["bbox"][3] for c in above)
    height = max(c["bbox"][3] - c["bbox"][1] for c in above)
    return min(c["bbox"][1] for c in below) - top < 2.5 * height


def _short(run: list[list[dict]]) -> bool:
    cells = [c for cells in run for c in cells]
    return statistics.mean(c["words"] for c in cells) <= TABLE_MAX_WORDS_PER_CELL


def aligned_rows(words: list) -> bool:
    """Whether some TABLE_MIN_ROWS consecutive rows split into 2 or more aligned short cells: a table the layout
    analysis should look at, found or not by unruled_tables."""
    run: list = []
    for row in _rows(words):
        cells = _cells(row)
        if len(cells) >= 2 and all(c["words"] <= TABLE_MAX_WORDS_PER_CELL for c in cells) and \
                (not run or (_close(run[-1], cells) and len(cells) >= 2)):
            run.append(cells)
            if len(run) >= TABLE_MIN_ROWS:
                return True
        else:
            run = [cells] if len(cells) >= 2 and all(c["words"] <= TABLE_MAX_WORDS_PER_CELL for c in cells) else []
    return False


# --- writing ----------------------------------------------------------------------------------------------------


def _is_number(text: str) -> bool:
    return bool(NUMBER.match(text.strip()))


def _shape(texts: list[str]) -> tuple:
    return tuple("" if not t else "n" if _is_number(t) else "t" for t in texts)


def header_rows(table: Table, continued: bool = False) -> int:
    """How many of the table's first rows are its header (see the module docstring); 0 for a table going on from
    the page before whose first row reads like the row under it."""
    if table.rows < 2:
        return 0
    grid = _grid_texts(table)
    if continued and table.rows >= 3 and _shape(grid[0]) == _shape(grid[1]) and "n" in _shape(grid[0]) and \
            not any(c.colspan > 1 for c in table.cells if c.row == 0):
        return 0
    count = 1
    while count < table.rows - 1 and any(c.row == count - 1 and c.colspan > 1 for c in table.cells):
        count += 1
    return count


def _grid_texts(table: Table) -> list[list[str]]:
    grid = [[""] * table.cols for _ in range(table.rows)]
    for cell in table.cells:
        grid[cell.row][cell.col] = cell.text
    return grid


def table_markdown(table: Table, continued: bool = False) -> str:
    """The table in our convention (see the module docstring)."""
    cells = [c for c in table.cells]
    if mostly_right_to_left(" ".join(c.text for c in cells)):  # a right-to-left table's first column is its rightmost
        cells = [Cell(c.row, table.cols - c.col - c.colspan, c.rowspan, c.colspan, c.text) for c in cells]
        table = Table(table.bbox, table.rows, table.cols, cells)
    title = ""
    top = [c for c in cells if c.row == 0]
    if table.rows > 2 and len(top) == 1 and top[0].colspan == table.cols and table.cols > 1 and top[0].rowspan == 1:
        title = top[0].text
        cells = [Cell(c.row - 1, c.col, c.rowspan, c.colspan, c.text) for c in cells if c.row > 0]
        table = Table(table.bbox, table.rows - 1, table.cols, cells)
    n_head = header_rows(table, continued)
    grid = [[""] * table.cols for _ in range(table.rows)]
    group_rows = set()
    body_spans = False
    for cell in cells:
        grid[cell.row][cell.col] = cell.text
        if cell.row >= n_head and (cell.rowspan > 1 or cell.colspan > 1):
            alone = all(not o.text for o in cells if o.row == cell.row and o is not cell)
            if cell.rowspan == 1 and alone:
                group_rows.add(cell.row)  # a group row: its label, the rest of the row empty
            else:
                body_spans = True
    if body_spans:
        out = _html(table, n_head)
    else:
        header = []
        for c in range(table.cols):
            parts: list[str] = []
            for cell in cells:
                if cell.row < n_head and cell.col <= c < cell.col + cell.colspan and cell.text and \
                        (not parts or parts[-1] != cell.text):
                    parts.append(cell.text)
            header.append(" ".join(parts))
        body = [row for r, row in enumerate(grid) if r >= n_head and (any(row) or r in group_rows)]
        out = markdown_table([header] + body)
    return f"{title}\n\n{out}" if title else out


def markdown_table(rows: list[list[str]]) -> str:
    """Rows of cell texts as a Markdown table, the first row as its header."""
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    lines = ["| " + " | ".join(cell(c) for c in rows[0]) + " |", "|" + "---|" * width]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _html(table: Table, n_head: int) -> str:
    out = ["<table>"]
    by_row: dict[int, list[Cell]] = {}
    for cell in table.cells:
        by_row.setdefault(cell.row, []).append(cell)
    for r in range(table.rows):
        row = sorted(by_row.get(r, ()), key=lambda c: c.col)
        if not row:
            continue
        tag = "th" if r < n_head else "td"
        tds = []
        for cell in row:
            attrs = (f' rowspan="{cell.rowspan}"' if cell.rowspan > 1 else "") + \
                (f' colspan="{cell.colspan}"' if cell.colspan > 1 else "")
            tds.append(f"<{tag}{attrs}>{html.escape(' '.join(cell.text.split()))}</{tag}>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


# --- geometry ---------------------------------------------------------------------------------------------------


def inside(word, bbox) -> bool:
    """Whether the word's centre lies in the box."""
    x, y = (word[0] + word[2]) / 2, (word[1] + word[3]) / 2
    return bbox[0] <= x <= bbox[2] and bbox[1] <= y <= bbox[3]


def union(boxes) -> tuple[float, float, float, float]:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
