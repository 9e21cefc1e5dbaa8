"""A PDF page's text layer as Markdown, in the format the model is asked to write (config.OCR_PROMPT), with the
page's layout blocks (pages.blocks).

Built on PyMuPDF's own primitives (one TextPage: its lines, fonts and words; ``find_tables`` for ruled tables), and,
where these rules alone are unsure of a page, on PyMuPDF's layout analysis (render/layout.py: regions of a kind in
reading order, table grids). The choice is made per page (``needs_layout``) and recorded (pages.text_layer_analysis):

- ``fast``: plain prose, a letter, a one-column article: the rules alone (a few tens of ms a page);
- ``layout``: a page with rulings (a ruled or booktabs table), rows of aligned short cells (an unruled table),
  several columns, or text beside graphics (a chart with its labels, a table beside a figure): the layout analysis
  as well (a third of a second of CPU more), for its tables, headings, captions and furniture. A page whose text is
  mostly right to left stays on the fast path (``scripts.mostly_right_to_left``), as does one with more lines than the
  analysis is worth running on (layout.MAX_BOXES).

What the conversion does, page by page:

- Furniture: running heads, footers and page numbers go into the blocks (page_header, page_footer, page_number)
  but not into the text: a line alone in a margin band that repeats at the same place on a nearby page
  (``RunningLines``, a window of neighbours read on demand, so pages can still be expanded one at a time); a line the
  page alone shows to be furniture (render/furniture.py: its band, size and separation, and what it says: page
  counters, addresses, dates, citation lines, download stamps, revision numbers, confidentiality lines); a lone
  page number (``PAGE_NUMBER``) centred or in an outer corner; on the layout path, its page-header and page-footer
  regions in the bands. Words inside a table are never furniture (tables are found first).
- Tables (render/tables.py): ruled ones from ``find_tables`` (vector lines); on the layout path the analysis' table
  grids (unruled, booktabs, beside a chart), on the fast path words aligned in columns over at least three rows of
  short cells. Each is written with its header rows joined over their columns, or as HTML where a body cell spans.
- Reading order: units are cut into horizontal bands at vertical gaps, neighbouring bands that share a column gutter
  are merged, and each band is read column by column (an XY cut), so a column stays whole.
- Headings: a short block set larger than the page's body text, or wholly in bold at the body's size, or a title or
  section header to the layout analysis, is a ``#`` heading (larger sizes, then bold, fewer ``#``); captions ("Table
  2: ...", "Source: ...") never are. Bullets become ``- `` list items.
- The displayed frame: a page turned by /Rotate is read from an upright copy, and a page whose text runs up or down
  (a table set sideways) from a copy turned to run left to right; block boxes are fractions of the displayed page.
- Characters (``normalise_chars``, also applied to PDFium's plain text): TeX-style spacing accents joined with their
  letter ("J´an" -> "Ján"), NFC, ligatures split ("ﬁ" -> "fi"), doubled single quotes made double quotes, soft
  hyphens dropped, a word hyphenated across lines joined (``scripts.join_hyphenated``: the hyphen kept in the page's
  compounds).
- Scripts (render/scripts.py): right-to-left lines are read in logical order (``scripts.read_page``), table cells'
  words in reading order, and a right-to-left table's first column is its rightmost.

Formulas are not written here: no text layer gives LaTeX. ``math_chars`` counts what route.py needs to send a page
with formulas to the model.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from docpipe.render import furniture as furniture_rules
from docpipe.render.furniture import HEADING_RATIO, band_of, is_caption
from docpipe.render.layout import MAX_BOXES, Region, analyse
from docpipe.render.scripts import hyphenated_words, join_hyphenated, mostly_right_to_left, page_words, read_page
from docpipe.render.tables import markdown_table  # noqa: F401  (re-exported: callers took it from here)
from docpipe.render.tables import (NUMBER, Table, aligned_rows, apart_from_graphics, fill, horizontal_rules,
                                   ruled_tables, side_by_side, table_markdown, unruled_tables, widen_group_headers,
                                   inside, union, unspaced, without_prose, word_count)
from docpipe.schemas import FURNITURE

SAME_PLACE_PT = 4.0  # a repeated line is at the same place when its centre moved less than this
NEIGHBOURS = 2  # pages either side compared for running lines
HEADING_MAX_WORDS = 16
BOLD_HEADING_RATIO = 0.95  # a block wholly in bold at least this share of the body's size can be a heading
BOLD_FONT = re.compile(r"bold|black|heavy|semibold|demi|-bd\b", re.I)
BULLET = re.compile(r"^([•◦▪‣∙·●○■□➢►✓]|[-–*]\s)")
NUMBERED = re.compile(r"^(\d{1,3}|[a-z])[.)]\s")
LIST_MARK = re.compile(r"^([•◦▪‣∙·●○■□➢►✓]|[-–*]\s|\d{1,3}[.)]\s|[a-z][.)]\s"  # a list item's mark
                       r"|\([a-z0-9]{1,3}\)\s)")
MIN_PICTURE = 0.02  # an image or drawing covering this share of the page is a picture block
BESIDE_GRAPHIC = 0.005  # a graphic this large with text at its side makes the rules unsure of the page
BACKGROUND = 0.8  # a fill or image covering this share of the page is its background, not a picture
TOUCH_PT = 3.0  # drawings this close belong to one graphic
MAX_PATHS = 2000  # drawings grouped into graphics, at most (a map can have tens of thousands)
SMALLER = 0.95  # a line under this share of the body's size is set smaller than the body
COVERED = 0.8  # a page with this share of its words in ruled tables needs no layout analysis
LAYOUT_BAND = 0.15  # the layout's page-header and page-footer regions count as furniture within this band

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


def _roman_value(numeral: str) -> int:
    values = [ROMAN_VALUES[ch] for ch in numeral.lower()]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def _mark(line: dict, block_bbox, page: int, width: float, height: float) -> _Mark | None:
    """The line as a candidate running line, or None when it cannot be one: outside the margin bands; part of a
    block that reaches out of its band (a paragraph's first or last line); set in a monospace font (code repeats
    "}" at the same place); without a letter or digit; mostly numbers (a table row carried over)."""
    bbox = tuple(line["bbox"])
    band = band_of(bbox, width, height)
    if band is None or band_of(block_bbox, width, height) != band:
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
                page = upright(self.doc.load_page(index))  # in the frame the page itself is read in
                blocks = read_page(page)[1]  # scripts: right-to-left lines in logical order
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


class PageMarkdown(str):
    """A page's Markdown (a str: what TextLayer.page_text gives) with what else the conversion found: ``blocks``
    (pages.blocks: kind, text, box as fractions of the displayed page, furniture included, in reading order) and
    ``analysis`` (pages.text_layer_analysis: ``fast`` or ``layout``)."""

    blocks: list[dict]
    analysis: str

    def __new__(cls, text: str, blocks: list[dict], analysis: str):
        obj = super().__new__(cls, text)
        obj.blocks, obj.analysis = blocks, analysis
        return obj


@dataclass
class _Unit:
    """A piece of the page read as one: text lines (a block, or the part of one in a layout region), a table, or a
    picture. ``kind``: a BlockKind value when already known (the layout's region, furniture), else decided from the
    lines (heading, list item, caption, paragraph)."""

    bbox: tuple[float, float, float, float]
    lines: list[dict] = field(default_factory=list)  # PyMuPDF line dicts
    table: Table | None = None
    kind: str | None = None


def page_markdown(page, textpage=None, blocks: list | None = None, running: RunningLines | None = None,
                  analysis: str = "auto") -> PageMarkdown:
    """The page's text layer as Markdown with its blocks (see the module docstring). ``textpage`` and ``blocks`` (its
    extractDICT blocks) when the caller already made them; ``running``: the document's RunningLines; ``analysis``:
    ``auto`` (the layout analysis where the rules are unsure: ``needs_layout``), ``fast`` or ``layout`` (every
    page; for the bench)."""
    import pymupdf

    index = page.number
    shown = upright(page)
    if shown is not page:
        textpage = blocks = None
    if blocks is None:
        textpage, blocks = read_page(shown, textpage)  # scripts: right-to-left lines in logical order
    elif textpage is None:
        textpage = shown.get_textpage(flags=pymupdf.TEXTFLAGS_TEXT)
    to_page = _to_page(shown.rect, pymupdf.Identity)
    turn = _turn(blocks)
    if turn:
        shown, back = _turned(shown, turn)
        to_page = _to_page(upright(page).rect, back)
        textpage, blocks = read_page(shown)
    rect = shown.rect
    lines = [line for block in blocks for line in block.get("lines", ()) if _line_text(line).strip()]
    body = _body_size(lines)
    words = page_words(textpage, blocks)  # scripts: right-to-left lines' words in logical order
    log = shown.get_bboxlog()  # what the page draws: rules, images, fills (one pass for every use below)
    drawn = graphics(log, rect)
    tables = ruled_tables(shown, words, log)
    use_layout = analysis == "layout" or (analysis == "auto" and needs_layout(rect, blocks, lines, words, tables, log,
                                                                              drawn))
    regions = analyse(shown) if use_layout and lines else []
    if use_layout:
        rules = horizontal_rules(log)
        for region in regions:
            if region.kind != "table" or any(_overlap(region.bbox, t.bbox) > 0.5 for t in tables):
                continue  # a table drawn with lines all round: find_tables read its cells exactly
            table = fill(region.rows, region.cols, region.spans, [w for w in words if inside(w, region.bbox)],
                         region.bbox)
            widen_group_headers(table, rules, region.rows, region.cols)
            table = without_prose(table)
            if table is None:
                continue
            parts = apart_from_graphics(table, [g for g in drawn if g[3] - g[1] > 3 and g[2] - g[0] > 3])
            tables += [t for part in parts for t in side_by_side(part)]
    else:
        ruled_boxes = [t.bbox for t in tables]
        tables += unruled_tables([w for w in words if not _inside_any(_centre(w[:4]), ruled_boxes)])
    table_boxes = [t.bbox for t in tables]
    furniture = _furniture(blocks, lines, index, rect, running, body, table_boxes, regions)
    units = [_Unit(t.bbox, table=t, kind="table") for t in tables]
    units += _text_units(blocks, furniture, table_boxes, [r for r in regions if r.kind != "table"])
    units += _pictures(rect, regions, units, drawn)
    ordered = _reading_order(units)
    compounds = hyphenated_words(_line_text(ln) for ln in lines)  # how the page spells its compounds
    return _write(ordered, body, to_page, "layout" if use_layout else "fast", compounds)


def _write(units: list[_Unit], body: float, to_page, analysis: str, compounds: set[str] = frozenset()
           ) -> PageMarkdown:
    """The units, in reading order, as Markdown and blocks; ``compounds``: the page's hyphenated words
    (scripts.join_hyphenated)."""
    for unit in units:
        if unit.kind is None or unit.kind in ("paragraph", "heading", "title"):
            unit.kind = _kind(unit, body)
    keys = sorted({_heading_key(u) for u in units if u.kind in ("heading", "title")}, reverse=True)
    parts, out, started = [], [], False
    for unit in units:
        if unit.kind == "table":
            text = table_markdown(unit.table, continued=not started)
        elif unit.kind in ("heading", "title"):
            level = 1 if unit.kind == "title" else min(keys.index(_heading_key(unit)) + 1, 3)
            text = "#" * level + " " + " ".join(_line_text(ln).strip() for ln in unit.lines)
        elif unit.kind in FURNITURE:
            text = " ".join(_line_text(ln).strip() for ln in unit.lines)
        elif unit.kind == "list_item":
            text = _paragraph(unit.lines, compounds)
            if not LIST_MARK.match(text):
                text = "- " + text
        else:
            text = _paragraph(unit.lines, compounds)
        text = clean_text(text)
        if not text and unit.kind != "picture":
            continue
        out.append({"kind": unit.kind, "text": text, **to_page(unit.bbox)})
        if unit.kind not in FURNITURE and text:
            parts.append(text)
            started = True
    return PageMarkdown(clean_text("\n\n".join(parts)), out, analysis)


def _kind(unit: _Unit, body: float) -> str:
    """A text unit's kind from its lines, where the layout gave none or one the lines overrule: a caption is never
    a heading; a short block set larger than the body, or in bold at the body's size, is one."""
    text = " ".join(_line_text(ln).strip() for ln in unit.lines)
    if is_caption(text):
        return "caption"
    if unit.kind in ("heading", "title") and word_count(text) <= HEADING_MAX_WORDS * 2:
        return unit.kind
    if _is_heading(unit, body):
        return "heading"
    if LIST_MARK.match(text.lstrip()):
        return "list_item"
    return "paragraph"


def _heading_key(unit: _Unit) -> tuple[float, bool]:
    return round(_size(unit.lines) * 2) / 2, _bold(unit.lines)


def _text_units(blocks: list, furniture: dict[int, str], table_boxes: list, regions: list[Region]) -> list[_Unit]:
    """Units of the page's text lines outside tables: furniture apart (by block and kind); lines in a layout
    region grouped by region and block, with the region's kind; other lines by block. A bullet starts a new unit
    (a list item) that the lines after it join."""
    units: list[_Unit] = []
    current: dict[tuple, _Unit] = {}
    for b, block in enumerate(blocks):
        for line in block.get("lines", ()):
            text = _line_text(line).strip()
            if not text or _inside_any(_centre(line["bbox"]), table_boxes):
                continue
            kind = furniture.get(id(line))
            if kind is not None:
                key: tuple = ("furniture", b, kind)
            else:
                region = _region_of(line, regions)
                if region is not None and region.kind in FURNITURE:
                    region = None  # _furniture had its say: the line is body text
                kind = region.kind if region is not None else None
                key = (b, id(region))
                if kind in (None, "paragraph", "list_item"):
                    unit = current.get(key)
                    if BULLET.match(text):
                        kind = "list_item"
                        current.pop(key, None)
                    elif NUMBERED.match(text) and unit is not None and \
                            NUMBERED.match(_line_text(unit.lines[0]).strip()):
                        kind = None  # the next item of a numbered list (_kind: a list item, or a heading)
                        current.pop(key, None)
            unit = current.get(key)
            if unit is None:
                unit = current[key] = _Unit(tuple(line["bbox"]), [line], kind=kind)
                units.append(unit)
            else:
                unit.lines.append(line)
                unit.bbox = union([unit.bbox, line["bbox"]])
    return units


def _region_of(line: dict, regions: list[Region]) -> Region | None:
    """The smallest layout region that holds the line's centre."""
    x, y = _centre(line["bbox"])
    holding = [r for r in regions if r.bbox[0] - 1 <= x <= r.bbox[2] + 1 and r.bbox[1] - 1 <= y <= r.bbox[3] + 1]
    return min(holding, key=lambda r: (r.bbox[2] - r.bbox[0]) * (r.bbox[3] - r.bbox[1]), default=None)


def _pictures(rect, regions: list[Region], units: list[_Unit], drawn: list[tuple]) -> list[_Unit]:
    """Picture blocks (no text of their own): the layout's picture regions, and the page's images and vector
    drawings (``graphics``) over MIN_PICTURE of its area that no table, text unit or such region already holds."""
    boxes = [r.bbox for r in regions if r.kind == "picture"]
    area = abs(rect) or 1.0
    boxes += [g for g in drawn if (g[2] - g[0]) * (g[3] - g[1]) >= MIN_PICTURE * area]
    taken = [u.bbox for u in units if u.kind in ("picture", "table")]
    out: list[_Unit] = []
    for b in boxes:
        if not any(_overlap(b, t) > 0.5 for t in taken):
            out.append(_Unit(tuple(b), kind="picture"))
            taken.append(b)
    return out


def graphics(log: list, rect) -> list[tuple[float, float, float, float]]:
    """Boxes of the page's images and of its drawings (``log``: its get_bboxlog()) grouped where they touch: a photo,
    a chart's bars and axes. Not a fill covering most of the page (a background)."""
    area = abs(rect) or 1.0
    paths, images = [], []
    for kind, b in log:
        w, h = b[2] - b[0], b[3] - b[1]
        if kind in ("fill-image", "fill-imgmask"):
            images.append(tuple(b))
        elif kind in ("fill-path", "stroke-path") and min(w, h) > 3 and w * h < BACKGROUND * area:
            paths.append(tuple(b))
        elif kind == "stroke-path" and len(paths) < MAX_PATHS:  # an axis or a tick beside other drawings
            paths.append(tuple(b))
    clusters: list[list[float]] = []
    for b in sorted(paths[:MAX_PATHS], key=lambda b: b[0]):
        for c in clusters:
            if b[0] <= c[2] + TOUCH_PT and c[0] <= b[2] + TOUCH_PT and \
                    b[1] <= c[3] + TOUCH_PT and c[1] <= b[3] + TOUCH_PT:
                c[:] = [min(c[0], b[0]), min(c[1], b[1]), max(c[2], b[2]), max(c[3], b[3])]
                break
        else:
            clusters.append(list(b))
    drawn = [tuple(c) for c in clusters if (c[2] - c[0]) * (c[3] - c[1]) < BACKGROUND * area]
    return [b for b in images if (b[2] - b[0]) * (b[3] - b[1]) < BACKGROUND * area] + drawn


# --- when to run the layout analysis --------------------------------------------------------------------------


def needs_layout(rect, blocks: list, lines: list[dict], words: list, tables: list, log: list, drawn: list) -> bool:
    """Whether the rules alone are unsure of the page: rulings (a ruled or booktabs table), rows of aligned short
    cells (an unruled table), several columns, or text beside graphics (a chart or figure with its labels and a
    caption or table at its side). Plain prose is not; nor a page whose words are mostly in ruled tables (read
    exactly already), nor a right-to-left page, nor one with more than layout.MAX_BOXES lines (the analysis' cost
    grows with them)."""
    if not lines or len(lines) > MAX_BOXES:
        return False
    if mostly_right_to_left("".join(_line_text(ln) for ln in lines)):  # its lines are in logical order only here
        return False
    if tables:
        boxes = [t.bbox for t in tables]
        covered = sum(1 for w in words if _inside_any(_centre(w[:4]), boxes))
        return covered < COVERED * len(words)  # a page that is one ruled table (a printed sheet) is read already
    rules = [b for kind, b in log if kind == "stroke-path"
             or (kind == "fill-path" and min(b[2] - b[0], b[3] - b[1]) <= 3)]
    if len(rules) >= 3 or aligned_rows(words):
        return True
    text_boxes = [tuple(b["bbox"]) for b in blocks if b.get("lines")]
    if _several_columns([_Unit(b) for b in text_boxes]):
        return True
    area = abs(rect) or 1.0
    shown = [g for g in drawn if (g[2] - g[0]) * (g[3] - g[1]) >= BESIDE_GRAPHIC * area]
    return any(_beside(g, t) for g in shown for t in text_boxes)


def _several_columns(units: list[_Unit]) -> bool:
    """Whether the page has columns: bands merged as for the reading order, one of them split at a gutter with
    more than one block on each side (a header's two halves or a signature line are not columns)."""
    return any(sum(len(column) >= 2 for column in _split(band, axis=0)) >= 2 for band in _bands(units))


def _beside(graphic, text) -> bool:
    """Whether a text block stands at a graphic's side (their heights overlap by most of the block's)."""
    overlap = min(graphic[3], text[3]) - max(graphic[1], text[1])
    return overlap > 0.5 * (text[3] - text[1]) and (text[0] >= graphic[2] or text[2] <= graphic[0])


# --- the displayed frame --------------------------------------------------------------------------------------


def upright(page):
    """The page as it is shown: itself, or for a page turned by /Rotate an upright copy (MuPDF gives text boxes in
    the unrotated frame, and the same page stored upright must read the same)."""
    if not page.rotation:
        return page
    copy = _copy(page)
    copy.remove_rotation()
    return copy


def _turned(page, turn: int):
    """(a copy of the page turned by ``turn`` degrees, the matrix that turns its boxes back)."""
    copy = _copy(page)
    copy.set_rotation(turn)
    back = ~copy.rotation_matrix
    copy.remove_rotation()
    return copy, back


def _to_page(rect, back):
    """box (points, in the frame read) -> its edges as fractions of the displayed page ``rect``, clamped to it."""
    import pymupdf

    w, h = rect.width or 1.0, rect.height or 1.0

    def to_page(bbox) -> dict[str, float]:
        r = pymupdf.Rect(bbox) * back
        return {"x0": _clamp((r.x0 - rect.x0) / w), "y0": _clamp((r.y0 - rect.y0) / h),
                "x1": _clamp((r.x1 - rect.x0) / w), "y1": _clamp((r.y1 - rect.y0) / h)}

    return to_page


def _clamp(v: float) -> float:
    return min(max(v, 0.0), 1.0)


def _copy(page):
    """The page alone in a new document, which the copy keeps alive (a page outlives its document in error)."""
    import pymupdf

    doc = pymupdf.open()
    doc.insert_pdf(page.parent, from_page=page.number, to_page=page.number)
    copy = doc[0]
    copy._docpipe_doc = doc
    return copy


def _turn(blocks: list) -> int:
    """The rotation (90 or 270) that makes most of the page's text run left to right (a table set sideways), or
    0."""
    counts = {0: 0, 90: 0, 270: 0}
    for block in blocks:
        for line in block.get("lines", ()):
            dy = line["dir"][1]
            counts[90 if dy < -0.9 else 270 if dy > 0.9 else 0] += sum(len(s["text"].strip()) for s in line["spans"])
    turn = max(counts, key=counts.get)
    return turn if turn and counts[turn] > 2 * counts[0] else 0


# --- furniture ------------------------------------------------------------------------------------------------


def _furniture(blocks: list, lines: list[dict], index: int, rect, running: RunningLines | None, body: float,
               table_boxes: list, regions: list[Region]) -> dict[int, str]:
    """id(line) -> kind (page_header, page_footer, page_number) for the page's furniture, never inside a table:
    lines repeated at the same place on a neighbour page (a line set as a heading is kept: running heads are set
    no larger than the body); lines the page alone shows to be furniture (furniture.single_page); and on the layout
    path, the lines of its page-header and page-footer regions in the margin bands that are set smaller than the
    body (a total or a last line at the body's size stays; a lone number only where page numbers go, as above).

    A lone page number (PAGE_NUMBER) without a neighbour's to confirm it (a one-page document, a number the
    neighbours lack) is dropped only where page numbers go: centred or in an outer corner, alone on its row, in the
    top or bottom band; elsewhere a number in the margin is as likely a total or a footnote's value, so it stays."""
    marks = _page_marks(blocks, index, rect)
    repeated = running.repeated(index, [m for _, m in marks]) if running is not None else set()
    found: dict[int, str] = {}
    for line, mark in marks:
        if _inside_any(_centre(line["bbox"]), table_boxes):
            continue
        if mark in repeated and _size([line]) < body * HEADING_RATIO:
            found[id(line)] = "page_number" if mark.page_number else \
                "page_header" if mark.band in ("top", "left") else "page_footer"
    free = [(line, block) for block in blocks for line in block.get("lines", ())
            if _line_text(line).strip() and not _inside_any(_centre(line["bbox"]), table_boxes)]
    infos = [furniture_rules.Line(_line_text(ln), tuple(ln["bbox"]), tuple(block["bbox"]), _size([ln]), _bold([ln]))
             for ln, block in free]

    def page_number(i: int) -> bool:
        ln = free[i][0]
        return bool(PAGE_NUMBER.match(" ".join(_line_text(ln).split()))) and _where_page_numbers_go(ln, lines, rect)

    for i, kind in furniture_rules.single_page(infos, rect.width, rect.height, body, page_number).items():
        found.setdefault(id(free[i][0]), kind)
    for region in regions:
        if region.kind in ("page_header", "page_footer") and (
                region.bbox[3] <= rect.height * LAYOUT_BAND or region.bbox[1] >= rect.height * (1 - LAYOUT_BAND)):
            for ln, _ in free:
                x, y = _centre(ln["bbox"])
                if region.bbox[0] - 1 <= x <= region.bbox[2] + 1 and region.bbox[1] - 1 <= y <= region.bbox[3] + 1 \
                        and not is_caption(_line_text(ln)) and _size([ln]) < body * SMALLER \
                        and not PAGE_NUMBER.match(" ".join(_line_text(ln).split())):
                    found.setdefault(id(ln), region.kind)
    return found


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


def _overlap(a, b) -> float:
    """The share of the smaller box that the two boxes share."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])) or 1.0
    return w * h / smaller


def _size(lines: list[dict]) -> float:
    return max((span["size"] for ln in lines for span in ln["spans"] if span["text"].strip()), default=0.0)


def _bold(lines: list[dict]) -> bool:
    """Every visible span set in a bold face (MuPDF's bold flag, or the font's name)."""
    spans = [s for ln in lines for s in ln["spans"] if s["text"].strip()]
    return bool(spans) and all(s["flags"] & 16 or BOLD_FONT.search(s["font"]) for s in spans)


def _body_size(lines: list[dict]) -> float:
    """The size most characters are set in."""
    weights: dict[float, int] = {}
    for ln in lines:
        for span in ln["spans"]:
            weights[round(span["size"], 1)] = weights.get(round(span["size"], 1), 0) + len(span["text"].strip())
    return max(weights, key=weights.get) if weights else 0.0


def _is_heading(unit: _Unit, body: float) -> bool:
    """A short block (at most 3 lines, HEADING_MAX_WORDS words, CJK by characters) set at least HEADING_RATIO
    times the body's size, or wholly in bold at about the body's size and not ending a sentence; never a caption,
    nor a number."""
    if not unit.lines or body <= 0 or len(unit.lines) > 3:
        return False
    text = " ".join(_line_text(ln) for ln in unit.lines).strip()
    if not text or word_count(text) > HEADING_MAX_WORDS or is_caption(text) or NUMBER.match(text):
        return False
    size = _size(unit.lines)
    if size >= body * HEADING_RATIO:
        return True
    return size >= body * BOLD_HEADING_RATIO and _bold(unit.lines) and not text.endswith((".", ","))


def _paragraph(lines: list[dict], compounds: set[str] = frozenset()) -> str:
    """A block's lines as one paragraph: a word hyphenated at a line's end joined (scripts.join_hyphenated: the
    hyphen kept in compounds), lines joined by spaces (none between Chinese or Japanese characters); a bullet made a
    Markdown list item."""
    text = ""
    for ln in lines:
        line = _line_text(ln).strip()
        if re.match(r"^[•◦▪‣∙·]\s*", line):
            text += ("\n" if text else "") + "- " + re.sub(r"^[•◦▪‣∙·]\s*", "", line)
        elif (joined := join_hyphenated(text, line, compounds)) is not None:
            text = joined
        else:
            text += (" " if text and not (unspaced(text[-1]) and line and unspaced(line[0])) else "") + line
    return text


# --- reading order ------------------------------------------------------------------------------------------


def _reading_order(units: list[_Unit]) -> list[_Unit]:
    """Bands at vertical gaps, bands sharing a column gutter merged, each band read column by column."""
    if len(units) <= 1:
        return units
    bands = _bands(units)
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


def _bands(units: list[_Unit]) -> list[list[_Unit]]:
    """The units cut into bands at vertical gaps, neighbouring bands merged where columns go on through both (a
    gutter runs through the two, and one of them has columns of its own: a date beside the line under it is not)."""
    bands: list[list[_Unit]] = []
    for band in _split(units, axis=1):
        if bands and len(_split(bands[-1] + band, axis=0)) > 1 and \
                (len(_split(bands[-1], axis=0)) > 1 or len(_split(band, axis=0)) > 1):
            bands[-1] += band  # the same columns go on: keep them together, so each column is read whole
        else:
            bands.append(band)
    return bands


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
