"""Page furniture found on one page alone: headers, footers, page numbers and margin stamps, told from the body by
where they stand and what they say (text_layer.py adds the lines that repeat on neighbouring pages).

A line is furniture when its block lies wholly in the page's top or bottom band (or, for stamps, a side band), apart
from the body text (a gap of at least FURNITURE_GAP_EM body sizes), no larger than a heading, not a caption, and
it says what furniture says:

- a lone page number or counter ("12", "- 12 -", "Page 3 of 12", "xii"), centred or in an outer corner;
- a download or access stamp ("Downloaded from <host> at 6:51 on ...", "Download date: 28 Dec 2018");
- a citation line ("Month Year | Volume 8 | Issue 3 | e2748", "Vol. 12, No. 3, pp. 45-67");
- a revision, part number or document number ("Rev. C", "P/N 1234-567", "Doc. No. 42");
- a confidentiality or copyright line ("Confidential", "All rights reserved", "© 2024 ...");
- a web or mail address, a DOI, or a date, in a short line set no larger than the body and not starting with a
  footnote mark (a footnote with a URL is body text).

Once one line of a band block qualifies, the block's other lines and the band lines on its rows go with it (a journal
name beside its web address). Body text in a band stays: a paragraph's first or last line (its block reaches out of
the band), a table row (tables are found first), a caption ("Figure 2: ..."), a footnote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BAND = 0.1  # share of the page height (top and bottom) and width (sides) where furniture lives
FURNITURE_GAP_EM = 0.8  # least gap, in body sizes, between furniture and the body text nearest it
HEADING_RATIO = 1.15  # a line this much larger than the body is a heading, not furniture
SHORT_WORDS = 16  # weak evidence (an address, a date) counts only in a line this short

MONTHS = (r"(jan(uary)?|feb(ruary)?|mar(ch)?|apr(il)?|may|june?|july?|aug(ust)?|sep(t(ember)?)?|oct(ober)?|"
          r"nov(ember)?|dec(ember)?)\.?")
STRONG = re.compile(
    r"\bdownload(ed|s)?\b.*\b(from|by|on|at|date)\b|\bdownload date\b|\b(accessed|retrieved)\s+(on|from)\b"
    r"|\bprinted\s+on\b|\bpage\s+\d+\s*(of|/)\s*\d+\b"
    r"|\b(vol(ume)?\.?|issue|iss\.)\s*\d+\b|\bno\.\s*\d+\s*[,|]|\bpp?\.\s*\d+\s*[-–]\s*\d+"
    r"|\|\s*(vol|issue|e\d{3,})|\be\d{4,6}\b\s*$"
    r"|\b(rev(ision)?(\.\s*|\s*[:#]\s*|\s+)[a-z0-9]{1,4}\b"  # "Rev. C", "Revision 3"; not "revenue"
    r"|p/n\b|part\s*(no\.?|number|#)|doc(ument)?\.?\s*(no\.?|number|id|#))"
    r"|\b(confidential|proprietary|internal use only|all rights reserved|do not (copy|distribute))\b|©|\(c\)\s*\d{4}"
    r"|\bcopyright\b|\barxiv:\s*\d{4}\.\d{4,5}",
    re.I)
WEAK = re.compile(
    r"(https?://|www\.)\S+|\b[\w-]+(\.[\w-]+)*\.(org|com|net|edu|gov|int|io|info)\b|\bdoi\s*:|\b10\.\d{4,}/\S+"
    r"|[\w.+-]+@[\w-]+\.\w|\b\d{1,2}\s+" + MONTHS + r"\s+\d{4}\b|\b" + MONTHS + r"\s+\d{1,2},?\s+\d{4}\b"
    r"|\b" + MONTHS + r"\s+\d{4}\b|\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}[./]\d{1,2}[./]\d{2,4}\b",
    re.I)
CAPTION = re.compile(r"^(table|tab\.|figure|fig\.|chart|exhibit|graph|plate|scheme|listing|map|source|sources|note|"
                     r"notes)\s*([\dA-Z]{1,4}([.\-]\d+)*|[IVX]+)?\s*[:.\-–—]", re.I)
FOOTNOTE_MARK = re.compile(r"^([*†‡§¶]|\d{1,2}\s|\(\d{1,2}\)|\[\d{1,2}\])")


@dataclass
class Line:
    """What the rules need of one text line: its text, box, the box of its block, size and weight."""

    text: str
    bbox: tuple[float, float, float, float]
    block: tuple[float, float, float, float]
    size: float
    bold: bool


def band_of(bbox, width: float, height: float) -> str | None:
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


def is_caption(text: str) -> bool:
    return bool(CAPTION.match(text.strip()))


def single_page(lines: list[Line], width: float, height: float, body: float,
                page_number: callable) -> dict[int, str]:
    """Indexes of ``lines`` that are furniture on this page alone -> their kind (page_header, page_footer,
    page_number). ``page_number(i)``: whether line i is a lone page number where page numbers go (text_layer's
    rule, shared with the cross-page one)."""
    found: dict[int, str] = {}
    bands = [band_of(ln.block, width, height) if band_of(ln.bbox, width, height) else None for ln in lines]
    body_lines = [ln for ln, band in zip(lines, bands) if band is None]
    for i, (ln, band) in enumerate(zip(lines, bands)):
        if band is None or band != band_of(ln.bbox, width, height):
            continue
        text = " ".join(ln.text.split())
        if not text or is_caption(text) or not _apart(ln, band, body_lines, body):
            continue
        if page_number(i):
            found[i] = "page_number"
            continue
        if ln.size > body * HEADING_RATIO and body > 0:
            continue
        strong = bool(STRONG.search(text))
        weak = bool(WEAK.search(text)) and len(text.split()) <= SHORT_WORDS and not FOOTNOTE_MARK.match(text) \
            and (body <= 0 or ln.size <= body * 1.02)
        if band in ("left", "right") and not strong:
            continue
        if strong or weak:
            found[i] = _kind(band)
    # A qualifying line takes its block and its row's band lines with it.
    for i in list(found):
        ln = lines[i]
        for j, other in enumerate(lines):
            if j in found or bands[j] != bands[i] or bands[j] is None:
                continue
            same_block = other.block == ln.block
            same_row = other.bbox[1] < (ln.bbox[1] + ln.bbox[3]) / 2 < other.bbox[3]
            if (same_block or same_row) and not is_caption(other.text) and \
                    (other.size <= body * HEADING_RATIO or body <= 0):
                found[j] = _kind(bands[j])
    return found


def _kind(band: str) -> str:
    return "page_header" if band == "top" else "page_footer"


def _apart(ln: Line, band: str, body_lines: list[Line], body: float) -> bool:
    """Whether the line's block stands apart from the body text nearest it in its band's direction."""
    gap_needed = FURNITURE_GAP_EM * (body or ln.size)
    x0, y0, x1, y1 = ln.block
    for other in body_lines:
        ox0, oy0, ox1, oy1 = other.bbox
        if band == "top" and ox0 < x1 and x0 < ox1 and 0 <= oy0 - y1 < gap_needed:
            return False
        if band == "bottom" and ox0 < x1 and x0 < ox1 and 0 <= y0 - oy1 < gap_needed:
            return False
    return True
