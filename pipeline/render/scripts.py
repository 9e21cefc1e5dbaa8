"""What a page's text layer says in its scripts: right-to-left lines in logical order, garbage told apart from text,
words broken at a line's end joined.

Right-to-left text (Arabic, Hebrew, Persian, Urdu, Syriac, Thaana, N'Ko). What MuPDF gives for such a line (seen on
pages Chromium printed): it reverses each right-to-left run character by character, so Arabic-Indic and European digit
runs come out backwards ("٦١" for "١٦"), a ligature's several characters too (its lam-alef "لأ" as "أل"), and
spaces move across the run's edges ("المراجعة117-2024"); honouring the producer's ActualText spans it even drops
letters. So a line with right-to-left letters is rebuilt here from where its glyphs are drawn (``logical_blocks``):
the glyphs (from a text page that ignores ActualText, as each glyph's own character; a combining mark or a glyph's
extra characters kept with it) in visual order, left to right, then put in logical order by the Unicode
bidirectional algorithm (python-bidi, base direction that of the line's block); Arabic presentation forms (shaped
glyphs' characters) become their letters (NFKC: "ﻻ" -> "لا"). The line's words are rebuilt the same way, for tables.

What cannot be made right is found (``text_faults``) and sends the page to the model (route.py): right-to-left words
in visual order (a letter that only ends a word found at its start: Hebrew final forms, Arabic ة and ى), a layer
whose right-to-left text is mostly presentation forms (old producers wrote shaped glyphs, often in visual order),
and the marks of a broken font map (letters of two scripts inside one word, "(cid:12)" placeholders) or of mojibake
(UTF-8 read as Latin-1 or cp1252: "Ã©", "â€™"; ftfy's detector).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Right-to-left scripts' blocks: Hebrew to NKo and Samaritan..Arabic Extended (0590-08FF), their presentation forms
# (FB1D-FDFF, FE70-FEFF), and the historic ones beyond the BMP.
RTL = re.compile("[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc\U00010800-\U00010fff\U0001e800-\U0001efff]")
PRESENTATION = re.compile("[\ufb1d-\ufb4f\ufb50-\ufdff\ufe70-\ufefc]")
CID = re.compile(r"\(cid:\d+\)")
WORD = re.compile(r"\S+")
GAP_EM = 0.25  # glyphs further apart than this share of the font size are separated by a space
INK_GAP_EM = 0.6  # the same for boxes around the glyphs' ink (PDFium's), whose spaces are mostly its own
# Letters that only end a word: Hebrew final forms; Arabic taa marbuta and alef maqsura. At a word's start they say
# the word is stored backwards (visual order).
WORD_FINAL = set("ךםןףץ" "ةى")
MIN_REVERSED = 3  # words: fewer backwards words are a name or a typo, not a layer in visual order


def has_rtl(text: str) -> bool:
    return RTL.search(text) is not None


def _strong(ch: str) -> str | None:
    """'R' for a right-to-left letter, 'L' for a left-to-right one, None for the rest (digits, punctuation)."""
    cls = unicodedata.bidirectional(ch)
    return "R" if cls in ("R", "AL") else "L" if cls == "L" else None


def _unshaped(ch: str) -> str:
    """An Arabic or Hebrew presentation form as its letters, in logical order ("ﻻ" -> "لا"); other characters as they
    are (NFKC only here: elsewhere it would change superscripts and full-width forms)."""
    return unicodedata.normalize("NFKC", ch) if PRESENTATION.match(ch) else ch


# --- right-to-left lines in logical order ------------------------------------------------------------------------


def rtl_line_count(blocks: list) -> int:
    """Lines with right-to-left letters in extractDICT blocks."""
    return sum(1 for b in blocks for ln in b.get("lines", ()) if any(has_rtl(s["text"]) for s in ln["spans"]))


def read_page(page, textpage=None):
    """The page's text page and extractDICT blocks, right-to-left lines in logical order (``logical_blocks``): how
    every reader of a PyMuPDF page's text layer should get it. ``textpage``: one the caller made with
    TEXTFLAGS_TEXT."""
    import pymupdf

    if textpage is None:
        textpage = page.get_textpage(flags=pymupdf.TEXTFLAGS_TEXT)
    blocks = textpage.extractDICT()["blocks"]
    return logical_blocks(page, blocks) or (textpage, blocks)


def logical_blocks(page, blocks: list):
    """For a page with right-to-left lines (``blocks``: its extractDICT blocks), the text page and extractDICT-style
    blocks to read it from: each right-to-left line's text in logical order in one span (the style of the span with
    most characters), its words (``line["words"]``, extractWORDS tuples in logical order) for ``page_words``; None for
    a page without such lines. The text page ignores ActualText (see the module docstring), unless that leaves more
    replacement characters than honouring it (a producer whose glyphs are mapped by ActualText alone)."""
    import pymupdf

    if not rtl_line_count(blocks):
        return None
    textpage = page.get_textpage(flags=pymupdf.TEXTFLAGS_TEXT | pymupdf.TEXT_IGNORE_ACTUALTEXT)
    raw = textpage.extractRAWDICT()["blocks"]
    if _count(raw, "\ufffd") > sum(s["text"].count("\ufffd") for b in blocks for ln in b.get("lines", ())
                                   for s in ln["spans"]):
        textpage = page.get_textpage(flags=pymupdf.TEXTFLAGS_TEXT)
        raw = textpage.extractRAWDICT()["blocks"]
    for block in raw:
        lines = block.get("lines", ())
        chars = [c["c"] for ln in lines for s in ln["spans"] for c in s["chars"]]
        base = "R" if mostly_right_to_left(chars) else "L"
        for i, line in enumerate(lines):
            if any(has_rtl(c["c"]) for s in line["spans"] for c in s["chars"]) and tuple(line["dir"]) == (1.0, 0.0):
                _logical_line(line, base, block["number"], i)
            for span in line["spans"]:
                if "chars" in span:
                    span["text"] = "".join(c["c"] for c in span.pop("chars"))
    return textpage, raw


def _count(raw: list, ch: str) -> int:
    return sum(c["c"] == ch for b in raw for ln in b.get("lines", ()) for s in ln["spans"] for c in s["chars"])


@dataclass
class _Glyph:
    text: str  # logical order (a ligature's letters as its map gives them)
    x0: float
    x1: float
    y0: float
    y1: float
    size: float


def _glyphs(line: dict) -> list[_Glyph]:
    """The line's glyphs in drawing position order, left to right: each character with its bbox; a combining mark,
    or a character without width (a glyph's second and later characters, placed at its end), kept with the glyph
    whose box holds it (the one it ends, where two touch)."""
    chars = [(c, s["size"]) for s in line["spans"] for c in s["chars"]]
    bases, marks = [], []
    for c, size in chars:
        x0, y0, x1, y1 = c["bbox"]
        mark = unicodedata.category(c["c"]) in ("Mn", "Me") or (x1 - x0 < 0.01 and not c["c"].isspace())
        (marks if mark else bases).append((c, size))
    glyphs = sorted((_Glyph(_unshaped(c["c"]), *c["bbox"][::2], *c["bbox"][1::2], size) for c, size in bases),
                    key=lambda g: g.x0)
    for c, _ in marks:
        centre = (c["bbox"][0] + c["bbox"][2]) / 2
        host = min(glyphs, key=lambda g: (not g.x0 - 0.01 <= centre <= g.x1 + 0.01, abs(g.x1 - centre)), default=None)
        if host is not None:
            host.text += _unshaped(c["c"])
    return glyphs


def _visual(glyphs: list[_Glyph], gap_em: float = GAP_EM) -> str:
    """Glyphs as a visual-order string for the bidirectional algorithm, a space where they stand apart. A right-to-left
    glyph's several characters are written backwards, so the algorithm's reversal of the run brings them back."""
    out = []
    for prev, g in zip([None] + glyphs[:-1], glyphs):
        if prev is not None and not prev.text.isspace() and not g.text.isspace() and g.x0 - prev.x1 > gap_em * g.size:
            out.append(" ")
        out.append(g.text[::-1] if len(g.text) > 1 and has_rtl(g.text) else g.text)
    return "".join(out)


def _logical_line(line: dict, base: str, block_no: int, line_no: int) -> None:
    """Rewrites a rawdict line in place: one span holding its text in logical order, and its words."""
    from bidi.algorithm import get_display  # the implementation that mirrors brackets (UBA rule L4)

    glyphs = _glyphs(line)
    text = get_display(_visual(glyphs), base_dir=base)
    words, word = [], []
    for g in glyphs + [None]:
        if g is None or g.text.isspace() or (word and g.x0 - word[-1].x1 > GAP_EM * g.size):
            if word:
                words.append((min(w.x0 for w in word), min(w.y0 for w in word), max(w.x1 for w in word),
                              max(w.y1 for w in word), get_display(_visual(word), base_dir=base)))
            word = [] if g is None or g.text.isspace() else [g]
        else:
            word.append(g)
    # word_no: the word's place in the logical line, which the words of a table cell are read in (page_words)
    order = _logical_order([w[4] for w in words], text)
    line["words"] = [(*words[i][:5], block_no, line_no, n) for n, i in enumerate(order)]
    main = max(line["spans"], key=lambda s: len(s["chars"]))
    line["spans"] = [{**{k: v for k, v in main.items() if k != "chars"}, "text": text, "bbox": tuple(line["bbox"])}]


def logical_text(chars: list[tuple[str, tuple, float]]) -> str:
    """One line's characters (character, (x0, y0, x1, y1), font size), as another reader gives them (PDFium), in
    logical order as ``logical_blocks`` reads a line; base direction the line's own (most of its letters').
    Characters as given where the line has no right-to-left letter or does not run left to right."""
    text = "".join(ch for ch, _, _ in chars)
    xs = [b[0] for _, b, _ in chars]
    if not has_rtl(text) or max(xs, default=0) - min(xs, default=0) < max((abs(b[3] - b[1]) for _, b, _ in chars),
                                                                          default=0):
        return text
    from bidi.algorithm import get_display

    base = "R" if mostly_right_to_left(text) else "L"
    line = {"spans": [{"size": size, "chars": [{"c": ch, "bbox": box}]} for ch, box, size in chars]}
    # PDFium's boxes are the glyphs' ink, not their advance: a bracket's leaves a gap that is no space
    return get_display(_visual(_glyphs(line), INK_GAP_EM), base_dir=base)


def _logical_order(words: list[str], text: str) -> list[int]:
    """Indexes of ``words`` in the order they appear in ``text``; a word not found keeps its visual place at the end."""
    order, used = [], set()
    for token in WORD.finditer(text):
        key = sorted(token.group())
        match = next((i for i, w in enumerate(words) if i not in used and sorted(w) == key), None)
        if match is not None:
            used.add(match)
            order.append(match)
    return order + [i for i in range(len(words)) if i not in used]


def page_words(textpage, blocks: list) -> list:
    """The page's words (extractWORDS tuples), a right-to-left line's as ``logical_blocks`` rebuilt them."""
    rebuilt = {(w[5], w[6]): [] for b in blocks for ln in b.get("lines", ()) for w in ln.get("words", ())}
    if not rebuilt:
        return textpage.extractWORDS()
    words = [w for w in textpage.extractWORDS() if (w[5], w[6]) not in rebuilt]
    return words + [w for b in blocks for ln in b.get("lines", ()) for w in ln.get("words", ())]


def cell_text(words: list) -> str:
    """A table cell's words (extractWORDS tuples) as its text: row by row, each row in reading order (a right-to-left
    line's words by their logical place)."""
    rows: dict[int, list] = {}
    for w in words:
        rows.setdefault(round(w[1]), []).append(w)
    out = []
    for _, row in sorted(rows.items()):
        rtl = any(has_rtl(w[4]) for w in row)
        out.append(" ".join(w[4] for w in sorted(row, key=(lambda w: (w[5], w[6], w[7])) if rtl else (lambda w: w[0]))))
    return " ".join(out)


def visual_words(text: str) -> str:
    """Words (each in logical order) joined left to right as they stand on the page, put in logical order: a cell
    of an unruled table, made by joining its words by x."""
    if not has_rtl(text):
        return text
    from bidi.algorithm import get_display  # the implementation that mirrors brackets (UBA rule L4)

    return get_display(" ".join(get_display(w, base_dir="R") for w in text.split()), base_dir="R")


def mostly_right_to_left(text: str) -> bool:
    """Whether most of the letters are in a right-to-left script (Arabic, Hebrew, ...): a table's cells (its first
    column is then its rightmost), a page's lines (text_layer: such a page stays on the fast path)."""
    strong = [d for d in map(_strong, text) if d]
    return strong.count("R") > strong.count("L")


# --- garbage ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """Counts over a text layer's text that say it cannot be read as text (route.trust_text_layer's rules)."""

    words: int = 0
    broken_map_words: int = 0  # "(cid:NN)" placeholders; words mixing a right-to-left script's letters with others'
    mojibake: int = 0  # ftfy's count of mojibake sequences
    rtl_words: int = 0  # words with right-to-left letters
    reversed_words: int = 0  # of those, stored backwards (a word-final letter at the start)
    ordered_words: int = 0  # of those, stored forwards (a word-final letter at the end)
    presentation_chars: int = 0  # right-to-left characters that are presentation forms
    rtl_chars: int = 0  # right-to-left characters


def text_faults(text: str, stored: str | None = None) -> Faults:
    """The faults of a layer's text (in logical order, as read). ``stored``: the text as the layer maps it before any
    repair here (PyMuPDF's own, ActualText honoured), where presentation forms are counted; default ``text``."""
    from ftfy.badness import badness

    broken = len(CID.findall(text))
    tokens = WORD.findall(CID.sub(" ", text) if broken else text)
    words, rtl_words, reversed_words, ordered = len(tokens), 0, 0, 0
    for token in tokens if has_rtl(text) else ():
        if not has_rtl(token):
            continue
        rtl_words += 1
        letters = [ch for ch in token if ch.isalpha()]
        if any(not has_rtl(ch) and unicodedata.category(ch) not in ("Mn", "Me") for ch in letters):
            broken += 1
        if len(letters) > 1:
            reversed_words += letters[0] in WORD_FINAL
            ordered += letters[-1] in WORD_FINAL
    source = text if stored is None else stored
    # mojibake is never ASCII: only the other lines are read by ftfy's detector (most of a page's cost here)
    mojibake = badness("\n".join(line for line in text.splitlines() if not line.isascii()))
    return Faults(words=words, broken_map_words=broken, mojibake=mojibake, rtl_words=rtl_words,
                  reversed_words=reversed_words, ordered_words=ordered,
                  presentation_chars=len(PRESENTATION.findall(source)), rtl_chars=len(RTL.findall(source)))


def fault_reason(faults: Faults, max_fraction: float) -> str | None:
    """The route reason a layer's faults give (route.trust_text_layer), or None. ``max_fraction``: of the words."""
    allowed = max(1.0, max_fraction * faults.words)
    if faults.broken_map_words > allowed:
        return "broken_font_map"
    if faults.mojibake > allowed:
        return "mojibake"
    if faults.rtl_chars and faults.presentation_chars > faults.rtl_chars / 2:
        return "presentation_forms"
    backwards = faults.reversed_words
    if backwards >= MIN_REVERSED and backwards * 4 >= backwards + faults.ordered_words:  # a quarter: mixed order
        return "rtl_visual_order"
    return None


# --- words broken at a line's end -------------------------------------------------------------------------------

HYPHENATED = re.compile(r"\w+(?:-\w+)+")
LINE_END_PART = re.compile(r"(\w+)-$")
LINE_START_PART = re.compile(r"\w+")


def hyphenated_words(lines) -> set[str]:
    """Compounds spelled with a hyphen inside the given lines (not at their ends), case-folded: how the document
    spells them, for ``join_hyphenated``."""
    return {m.group().casefold() for line in lines for m in HYPHENATED.finditer(line.rstrip().rstrip("-"))}


def join_hyphenated(text: str, line: str, compounds: set[str] = frozenset()) -> str | None:
    """``text`` ending in a word part and a hyphen, continued by ``line``: the two joined, or None when the line end is
    no hyphenated word. The hyphen stays where the document spells the compound with one elsewhere (``compounds``),
    or where a part is a number or capitalised ("COVID-19", "X-ray", "non-European"); otherwise it was the
    typesetter's ("confer-\\nence" -> "conference")."""
    end = LINE_END_PART.search(text)
    start = LINE_START_PART.match(line)
    if end is None or start is None:
        return None
    first, second = end.group(1), start.group()
    keep = (f"{first}-{second}".casefold() in compounds or any(ch.isdigit() for ch in first + second)
            or first.isupper() or second[0].isupper())
    return text + line if keep else text[:-1] + line
