"""A PDF page's text layer as Markdown, in the format the model is asked to write (config.OCR_PROMPT).

Built on PyMuPDF's own primitives (one TextPage: its lines, fonts and words; ``find_tables`` for ruled tables)
rather than pymupdf4llm: its layout path (an ONNX model over the page image) cost about 0.4 s of CPU a page here,
twice the render stage's budget, and its legacy path scans the whole document for font sizes on every call, bakes
annotations and removes page rotation in the document we render from. What this module does, page by page:

- Running heads, footers and page numbers are dropped: a line alone in a margin band (its block wholly there, not
  in a monospace font) that repeats at the same height on a nearby page of the same document (``RunningLines``, a
  window of neighbours read on demand, so pages can still be expanded one at a time): the same text, or a short
  line whose numbers step with the page index ("Page 3 of 9" then "Page 4 of 9"); or a lone page number
  (``PAGE_NUMBER``) centred or in an outer corner. Words inside a table are never dropped (tables are found first).
- Tables become Markdown tables (first row as header); a ruled table whose cells span rows or columns becomes an
  HTML ``<table>`` with ``rowspan``/``colspan``, since a Markdown table has no way to say a cell spans. Ruled tables
  come from ``find_tables`` (vector lines, without the layout model); unruled ones from words aligned in columns
  over at least three rows of short cells.
- Reading order: text blocks are cut into horizontal bands at vertical gaps, neighbouring bands that share a column
  gutter are merged, and each band is read column by column (an XY cut), so a column stays whole.
- Headings: a short block set larger than the page's body text is a ``#`` heading (larger sizes, fewer ``#``).
- Characters (``normalise_chars``, also applied to PDFium's plain text): TeX-style spacing accents joined with their
  letter ("J´an" -> "Ján"), NFC, ligatures split ("ﬁ" -> "fi"), doubled single quotes made double quotes, soft
  hyphens dropped, a word hyphenated across lines joined.

Formulas are not written here: no text layer gives LaTeX. ``math_chars`` counts what route.py needs to send a page
with formulas to the model.
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from dataclasses import dataclass, field

from docpipe.render.scripts import (cell_text, hyphenated_words, join_hyphenated, page_words, read_page, rtl_table,
                                    visual_words)

BAND = 0.1  # share of the page height (top and bottom) and width (sides) where running lines live
SAME_PLACE_PT = 4.0  # a repeated line is at the same place when its centre moved less than this
NEIGHBOURS = 2  # pages either side compared for running lines
HEADING_RATIO = 1.15  # a heading's size over the body's
HEADING_MAX_WORDS = 16
CELL_GAP_EM = 1.0  # words further apart than this (in font heights) sit in different table cells
TABLE_MIN_ROWS = 3
TABLE_MAX_WORDS_PER_CELL = 4.0  # on average: prose in two columns has far more per line

# Spacing accents as TeX fonts draw them (a glyph of their own beside the letter) -> combining marks.
SPACING_ACCENTS = {
    "\u00b4": "\u0301", "`": "\u0300", "\u02c6": "\u0302", "^": "\u0302", "\u02dc": "\u0303", "~": "\u0303",
    "\u00a8": "\u0308", "\u02c7": "\u030c", "\u02d8": "\u0306", "\u02d9": "\u0307", "\u02da": "\u030a",
    "\u00af": "\u0304", "\u02dd": "\u030b", "\u00b8": "\u0327", "\u02db": "\u0328",
}
LIGATURES = {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "st",
             "\ufb06": "st"}
# Roman numerals 1..39, in one case: not words made of their letters ("Civil", "ill", "CLI").
ROMAN = r"(?-i:(?=[ivx])x{0,3}(?:ix|iv|v?i{0,3})|(?=[IVX])X{0,3}(?:IX|IV|V?I{0,3}))"
PAGE_NUMBER = re.compile(r"^(page|p\.|seite|pág\.?)?\s*[-–—(\[]?\s*(?P<number>\d{1,4}|" + ROMAN + r")\s*[-–—)\]]?"
                         r"(\s*(of|/|von|de)\s*\d{1,4})?$", re.I)
ROMAN_VALUES = {"i": 1, "v": 5, "x": 10}
RUNNING_MAX_WORDS = 10  # a line whose numbers step with the page is a running line only when this short
CENTRED = 0.05  # a lone page number's centre within this share of the page width of the page's centre
CORNER = 0.15  # ... or its outer edge within this share of the width of the page's edge
# Fonts that set mathematics: TeX's (Computer Modern, AMS, Latin Modern, txfonts/pxfonts), STIX, Cambria Math,
# MathTime, Symbol. A subset prefix ("ABCDEF+CMMI10") is dropped before matching.
MATH_FONT = re.compile(r"^(CMMI|CMSY|CMEX|CMBSY|CMMIB|MSAM|MSBM|EUFM|EUSM|EUEX|RSFS|ESINT|WASY|STMARY|LMMath|"
                       r"LatinModernMath|MTMI|MTSY|MTEX|MTSYN|txmi|txsy|txex|pxmi|pxsy|pxex|rtxmi|rtxsy|"
                       r"Symbol|StandardSymbol|MathematicalPi|Euclid|Mathematica|.*Math)", re.I)
# Math symbols that plain prose uses too: not counted as formula characters.
PROSE_SYMBOLS = set("+<=>|~¬±×÷%-−–")


def math_font(name: str) -> bool:
    return bool(MATH_FONT.match(name.split("+", 1)[-1]))


def math_char_count(text: str, font: str) -> int:
    """Characters of a span that belong to a formula: math symbols beyond prose's, and a math font's letters and
    digits. Not its punctuation or bullets: LaTeX sets list bullets in CMSY and contents' dot leaders in CMMI."""
    in_math_font = math_font(font)
    return sum((in_math_font and ch.isalnum()) or (unicodedata.category(ch) == "Sm" and ch not in PROSE_SYMBOLS)
               for ch in text)


# --- characters ---------------------------------------------------------------------------------------------


def _compose(accent: str, letter: str) -> str | None:
    """The accented letter as one character, or None when Unicode has none (then the pair is left alone)."""
    letter = {"ı": "i", "ȷ": "j"}.get(letter, letter)  # TeX puts accents on dotless i and j
    composed = unicodedata.normalize("NFC", letter + SPACING_ACCENTS[accent])
    return composed if len(composed) == 1 and composed.isalpha() else None


def _join_accents(text: str) -> str:
    """Each spacing accent joined with the letter after it ("J´an" -> "Ján", as TeX's text layers mostly give
    it), else with the letter before it ("caf´e" is "café", "e´t" is "ét"). ASCII ` ^ ~ only between two letters."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in SPACING_ACCENTS:
            ascii_like = ch in "`^~"
            j = i + 1
            after_letter = bool(out) and out[-1].isalpha()
            if not ascii_like and not after_letter and j + 1 < n and text[j] == " " and text[j + 1].isalpha():
                j += 1  # " ´ a": MuPDF put a space between a word's first letter and its accent
            between = after_letter and j < n and text[j].isalpha()
            if j < n and text[j].isalpha() and (not ascii_like or between):
                composed = _compose(ch, text[j])
                if composed:
                    out.append(composed)
                    i = j + 1
                    continue
            if after_letter and not ascii_like:
                composed = _compose(ch, out[-1])
                if composed:
                    out[-1] = composed
                    i += 1
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


def normalise_chars(text: str) -> str:
    """Characters as a reader (and the model) writes them; see the module docstring. Idempotent."""
    if not text:
        return text
    for lig, plain in LIGATURES.items():
        text = text.replace(lig, plain)
    text = text.replace("\u00ad", "").replace("\u00a0", " ")
    text = text.replace("\u2018\u2018", "\u201c").replace("\u2019\u2019", "\u201d")
    return unicodedata.normalize("NFC", _join_accents(text))


def normalise_layout(text: str) -> str:
    """Trailing spaces dropped, blank-line runs collapsed to one, ends trimmed."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def clean_text(text: str) -> str:
    """A text layer's text as pages carry it (either renderer's): characters and layout normalised."""
    return normalise_layout(normalise_chars(text))


# --- running heads and footers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mark:
    text: str  # the line's text, case-folded, spaces collapsed, a roman page number as its value in digits
    key: str  # the same, digit runs as '#'
    numbers: tuple[int, ...]  # its digit runs' values
    where: float  # its centre: y in the top and bottom bands, x in the side bands
    band: str  # top, bottom, left, right
    page: int  # the page's index
    page_number: bool  # the line reads as a page number (PAGE_NUMBER)


def _band(bbox, width: float, height: float) -> str | None:
    x0, y0, x1, y1 = bbox
    if y1 <= height * BAND:
        return "top"
    if y0 >= height * (1 - BAND):
        return "bottom"
    if x1 <= width * BAND:
        return "left"
    if x0 >= width * (1 - BAND):
        return "right"
    return None


def _roman_value(numeral: str) -> int:
    values = [ROMAN_VALUES[ch] for ch in numeral.lower()]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def _mark(line: dict, block_bbox, page: int, width: float, height: float) -> _Mark | None:
    """The line as a candidate running line, or None when it cannot be one: outside the margin bands; part of a
    block that reaches out of its band (a paragraph's first or last line); set in a monospace font (code repeats
    "}" at the same place); without a letter or digit; mostly numbers (a table row carried over)."""
    bbox = tuple(line["bbox"])
    band = _band(bbox, width, height)
    if band is None or _band(block_bbox, width, height) != band:
        return None
    text = " ".join(_line_text(line).split())
    if any(span["flags"] & 8 or "mono" in span["font"].lower() or "courier" in span["font"].lower()
           for span in line["spans"] if span["text"].strip()):  # flag 8: MuPDF's monospace bit
        return None
    if not any(ch.isalnum() for ch in text):
        return None
    number = PAGE_NUMBER.match(text)
    if number and not number.group("number").isdigit():
        text = text[:number.start("number")] + str(_roman_value(number.group("number"))) + text[number.end("number"):]
    text = text.casefold()
    numbers = tuple(int(n) for n in re.findall(r"\d+", text))
    if len(numbers) > 2:
        return None
    where = (bbox[1] + bbox[3]) / 2 if band in ("top", "bottom") else (bbox[0] + bbox[2]) / 2
    return _Mark(text, re.sub(r"\d+", "#", text), numbers, where, band, page, bool(number))


def _same_line(m: _Mark, o: _Mark) -> bool:
    """Whether o, on a neighbour page, is m's running line there: the same text at the same place (a running head
    or footer), or a short line whose numbers differ from m's in step with the page index while the rest agrees
    ("Page 2 of 9" and "Page 3 of 9"; not "Question 1" and "Question 2" in a longer line) and that reads as a page
    number or has its number at an end ("Journal of X · 3")."""
    if m.band != o.band or abs(m.where - o.where) >= SAME_PLACE_PT:
        return False
    if m.text == o.text:
        return True
    if m.key != o.key or len(m.numbers) != len(o.numbers):
        return False
    steps = [a - b for a, b in zip(m.numbers, o.numbers)]
    if not all(d in (0, m.page - o.page) for d in steps) or not any(steps):
        return False
    words = m.key.split()
    return len(words) <= RUNNING_MAX_WORDS and (m.page_number or "#" in words[0] or "#" in words[-1])


class RunningLines:
    """Lines that repeat at the same place on nearby pages of one document: running heads, footers, page numbers,
    "Downloaded from" stamps. Each page's margin lines are read once, when a page within ``NEIGHBOURS`` of it is
    converted, and forgotten when the conversion has moved on; so a 2,000-page PDF is still read page by page."""

    def __init__(self, doc):
        self.doc = doc
        self._marks: dict[int, list[_Mark]] = {}

    def marks(self, index: int, marks: list[_Mark] | None = None) -> list[_Mark]:
        """The margin lines of page ``index`` (``marks``: when the caller has them)."""
        if index not in self._marks:
            if marks is None:
                page = self.doc.load_page(index)
                blocks = read_page(page)[1]
                marks = [m for _, m in _page_marks(blocks, index, page.rect)]
            self._marks[index] = marks
        return self._marks[index]

    def repeated(self, index: int, own: list[_Mark]) -> set[_Mark]:
        """Of page ``index``'s margin lines, those repeated on a neighbour."""
        for old in [k for k in self._marks if k < index - NEIGHBOURS]:
            del self._marks[old]
        own = self.marks(index, own)
        if not own:
            return set()
        near = [m for n in range(max(0, index - NEIGHBOURS), min(self.doc.page_count, index + NEIGHBOURS + 1))
                if n != index for m in self.marks(n)]
        return {m for m in own if any(_same_line(m, o) for o in near)}


def _page_marks(blocks: list, index: int, rect) -> list[tuple[dict, _Mark]]:
    """(line, mark) for each of a page's lines that could be a running line."""
    return [(line, m) for block in blocks for line in block.get("lines", ()) if _line_text(line).strip()
            and (m := _mark(line, block["bbox"], index, rect.width, rect.height)) is not None]


def _line_text(line: dict) -> str:
    return "".join(span["text"] for span in line["spans"])


# --- the page -------------------------------------------------------------------------------------------------


@dataclass
class _Unit:
    """A piece of the page read as one: a text block (its lines) or a table (its Markdown)."""

    bbox: tuple[float, float, float, float]
    lines: list[dict] = field(default_factory=list)  # PyMuPDF line dicts
    markdown: str | None = None  # set for tables


def page_markdown(page, textpage=None, blocks: list | None = None, running: RunningLines | None = None) -> str:
    """The page's text layer as Markdown (see the module docstring). ``textpage`` and ``blocks`` (its extractDICT
    blocks) when the caller already made them; ``running``: the document's RunningLines."""
    if blocks is None:
        textpage, blocks = read_page(page, textpage)  # scripts: right-to-left lines in logical order
    rect = page.rect
    lines = [line for block in blocks for line in block.get("lines", ()) if _line_text(line).strip()]
    body = _body_size(lines)
    # Tables first, from all the words: a number in a table is data, even in a margin band (a totals row).
    words = page_words(textpage, blocks)  # scripts: right-to-left lines' words in logical order
    tables = _ruled_tables(page, words)
    table_boxes = [t.bbox for t in tables]
    tables += _unruled_tables([w for w in words if not _inside_any(_centre(w[:4]), table_boxes)])
    table_boxes = [t.bbox for t in tables]
    drop = _running(blocks, lines, page, rect, running, body, table_boxes)
    units = tables + [_Unit(tuple(block["bbox"]), kept) for block in blocks
                      if (kept := [ln for ln in block.get("lines", ()) if id(ln) not in drop
                                   and _line_text(ln).strip() and not _inside_any(_centre(ln["bbox"]), table_boxes)])]
    for unit in units:
        if unit.lines:
            unit.bbox = _union([ln["bbox"] for ln in unit.lines])
    compounds = hyphenated_words(_line_text(ln) for ln in lines)  # scripts.join_hyphenated
    heading_sizes = sorted({round(_size(u.lines), 1) for u in units if _is_heading(u, body)}, reverse=True)
    parts = []
    for unit in _reading_order(units):
        if unit.markdown is not None:
            parts.append(unit.markdown)
        elif _is_heading(unit, body):
            level = min(heading_sizes.index(round(_size(unit.lines), 1)) + 1, 3)
            parts.append("#" * level + " " + " ".join(_line_text(ln).strip() for ln in unit.lines))
        else:
            parts.append(_paragraph(unit.lines, compounds))
    return clean_text("\n\n".join(p for p in parts if p.strip()))


def _running(blocks: list, lines: list[dict], page, rect, running: RunningLines | None, body: float,
             table_boxes: list) -> set[int]:
    """ids of the lines that are running heads, footers or page numbers, never inside a table. A line set as a
    heading is kept even when it repeats: running heads are set no larger than the body ("Section 3" headings at
    the top of every page are not).

    A lone page number (PAGE_NUMBER) without a neighbour's to confirm it (a one-page document, a number the
    neighbours lack) is dropped only where page numbers go: centred or in an outer corner, alone on its row, in the
    top or bottom band; elsewhere a number in the margin is as likely a total or a footnote's value, so it stays."""
    marks = _page_marks(blocks, page.number, rect)
    repeated = running.repeated(page.number, [m for _, m in marks]) if running is not None else set()
    drop = set()
    for line, mark in marks:
        if _inside_any(_centre(line["bbox"]), table_boxes):
            continue
        if mark in repeated and _size([line]) < body * HEADING_RATIO:
            drop.add(id(line))
        elif mark.page_number and mark.band in ("top", "bottom") and _where_page_numbers_go(line, lines, rect):
            drop.add(id(line))
    return drop


def _where_page_numbers_go(line: dict, lines: list[dict], rect) -> bool:
    x0, y0, x1, y1 = line["bbox"]
    centred = abs((x0 + x1) / 2 - rect.width / 2) <= CENTRED * rect.width
    corner = x0 <= CORNER * rect.width or x1 >= (1 - CORNER) * rect.width
    alone = not any(o is not line and o["bbox"][1] < (y0 + y1) / 2 < o["bbox"][3] for o in lines)
    return (centred or corner) and alone


def _centre(bbox) -> tuple[float, float]:
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


def _inside_any(point, boxes) -> bool:
    x, y = point
    return any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes)


def _union(boxes) -> tuple[float, float, float, float]:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _size(lines: list[dict]) -> float:
    return max((span["size"] for ln in lines for span in ln["spans"] if span["text"].strip()), default=0.0)


def _body_size(lines: list[dict]) -> float:
    """The size most characters are set in."""
    weights: dict[float, int] = {}
    for ln in lines:
        for span in ln["spans"]:
            weights[round(span["size"], 1)] = weights.get(round(span["size"], 1), 0) + len(span["text"].strip())
    return max(weights, key=weights.get) if weights else 0.0


def _is_heading(unit: _Unit, body: float) -> bool:
    if not unit.lines or body <= 0 or len(unit.lines) > 3:
        return False
    text = " ".join(_line_text(ln) for ln in unit.lines)
    return _size(unit.lines) >= body * HEADING_RATIO and len(text.split()) <= HEADING_MAX_WORDS


def _paragraph(lines: list[dict], compounds: set[str] = frozenset()) -> str:
    """A block's lines as one paragraph: a word hyphenated at a line's end joined (scripts.join_hyphenated: the
    hyphen kept in compounds), lines joined by spaces; a bullet made a Markdown list item."""
    text = ""
    for ln in lines:
        line = _line_text(ln).strip()
        if re.match(r"^[•◦▪‣∙·]\s*", line):
            text += ("\n" if text else "") + "- " + re.sub(r"^[•◦▪‣∙·]\s*", "", line)
        elif (joined := join_hyphenated(text, line, compounds)) is not None:
            text = joined
        else:
            text += (" " if text else "") + line
    return text


# --- reading order ------------------------------------------------------------------------------------------


def _reading_order(units: list[_Unit]) -> list[_Unit]:
    """Bands at vertical gaps, bands sharing a column gutter merged, each band read column by column."""
    if len(units) <= 1:
        return units
    bands: list[list[_Unit]] = []
    for band in _split(units, axis=1):
        if bands and len(_split(bands[-1] + band, axis=0)) > 1:
            bands[-1] += band  # the same columns go on: keep them together, so each column is read whole
        else:
            bands.append(band)
    out = []
    for band in bands:
        columns = _split(band, axis=0)
        if len(columns) > 1:
            for column in columns:
                out += _reading_order(column)
        elif len(bands) > 1 and len(band) < len(units):
            out += _reading_order(band)
        else:
            out += sorted(band, key=lambda u: (u.bbox[1], u.bbox[0]))
    return out


def _split(units: list[_Unit], axis: int) -> list[list[_Unit]]:
    """Groups separated by a gap along ``axis`` (0: columns, by x; 1: bands, by y), in order."""
    ordered = sorted(units, key=lambda u: u.bbox[axis])
    groups, end = [], None
    for unit in ordered:
        if end is None or unit.bbox[axis] > end + (2.0 if axis == 0 else 0.0):
            groups.append([unit])
            end = unit.bbox[axis + 2]
        else:
            groups[-1].append(unit)
            end = max(end, unit.bbox[axis + 2])
    return groups


# --- tables ---------------------------------------------------------------------------------------------------


def _rules_area(page) -> tuple | None:
    """The box around the page's strokes and thin fills (what a ruled table is drawn with), or None without any:
    the table finder reads only the text there (it builds a Python object per character, the bulk of its cost)."""
    boxes = [bbox for kind, bbox in page.get_bboxlog() if kind == "stroke-path"
             or (kind == "fill-path" and min(bbox[2] - bbox[0], bbox[3] - bbox[1]) <= 3)]
    if not boxes:
        return None
    x0, y0, x1, y1 = _union(boxes)
    return (x0 - 2, y0 - 2, x1 + 2, y1 + 2)


def _ruled_tables(page, words: list) -> list[_Unit]:
    """Tables drawn with lines, from PyMuPDF's table finder without its layout model (an ONNX pass per page)."""
    area = _rules_area(page)
    if area is None:
        return []
    units = []
    for tab in page.find_tables(clip=area, strategy="lines", use_layout=False).tables:
        cells = [c for c in tab.cells if c is not None]
        if tab.row_count < 2 or tab.col_count < 2 or not cells:
            continue
        inside = [w for w in words if _inside_any(_centre(w[:4]), [tab.bbox])]  # cells then search only these
        units.append(_Unit(tuple(tab.bbox), markdown=_grid_markdown(cells, inside)))
    return units


def _grid_markdown(cells: list[tuple], words: list) -> str:
    """Cells (bboxes) with the words whose centres they hold, as a Markdown table, or as HTML when a cell spans."""
    xs = _edges([c[0] for c in cells] + [c[2] for c in cells])
    ys = _edges([c[1] for c in cells] + [c[3] for c in cells])
    placed = []
    for c in cells:
        c0, c1 = _index(xs, c[0]), _index(xs, c[2])
        r0, r1 = _index(ys, c[1]), _index(ys, c[3])
        text = cell_text([w for w in words if _inside_any(_centre(w[:4]), [c])])
        placed.append((r0, c0, max(1, r1 - r0), max(1, c1 - c0), text))
    rows, cols = len(ys) - 1, len(xs) - 1
    if rtl_table([p[4] for p in placed]):  # a right-to-left table's first column is its rightmost
        placed = [(r, cols - c - cs, rs, cs, text) for r, c, rs, cs, text in placed]
    if all(rs == 1 and cs == 1 for _, _, rs, cs, _ in placed):
        grid = [[""] * cols for _ in range(rows)]
        for r, c, _, _, text in placed:
            grid[r][c] = text
        return markdown_table([row for row in grid if any(row)])
    return _html_table(placed, rows)


def _edges(values: list[float], tol: float = 2.0) -> list[float]:
    out: list[float] = []
    for v in sorted(values):
        if not out or v - out[-1] > tol:
            out.append(v)
    return out


def _index(edges: list[float], v: float) -> int:
    return min(range(len(edges)), key=lambda i: abs(edges[i] - v))


def markdown_table(rows: list[list[str]]) -> str:
    """Rows of cell texts as a Markdown table, the first row as its header."""
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    lines = ["| " + " | ".join(cell(c) for c in rows[0]) + " |", "|" + "---|" * width]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _html_table(placed: list[tuple], rows: int) -> str:
    import html

    out = ["<table>"]
    for r in range(rows):
        cells = sorted((p for p in placed if p[0] == r), key=lambda p: p[1])
        if not cells:
            continue
        tds = []
        for _, _, rowspan, colspan, text in cells:
            attrs = (f' rowspan="{rowspan}"' if rowspan > 1 else "") + (f' colspan="{colspan}"' if colspan > 1 else "")
            tds.append(f"<td{attrs}>{html.escape(' '.join(text.split()))}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _unruled_tables(words: list) -> list[_Unit]:
    """Tables without lines: runs of at least TABLE_MIN_ROWS text rows that split, at gaps wider than
    CELL_GAP_EM, into the same number (2 or more) of short cells, each cell under the one above it."""
    rows = _rows(words)
    found, run = [], []
    for row in rows + [None]:
        cells = _cells(row) if row is not None else []
        if run and len(cells) == len(run[-1]) >= 2 and _aligned(run[-1], cells) and _close(run[-1], cells):
            run.append(cells)
            continue
        if len(run) >= TABLE_MIN_ROWS and _short(run):
            found.append(run)
        run = [cells] if len(cells) >= 2 else []
    units = []
    for run in found:
        boxes = [c["bbox"] for cells in run for c in cells]
        rows = [[visual_words(c["text"]) for c in cells] for cells in run]  # scripts: right-to-left cells' words
        rows = [row[::-1] for row in rows] if rtl_table([t for row in rows for t in row]) else rows
        units.append(_Unit(_union(boxes), markdown=markdown_table(rows)))
    return units


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
            c["words"] += 1
            c["bbox"] = _union([c["bbox"], w[:4]])
        else:
            cells.append({"text": w[4], "words": 1, "bbox": tuple(w[:4])})
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
