"""Which pages need the model: the PDF text layer's trust rules, and blank-page detection.

Pure functions, decided per page in the render stage. A page whose text layer is trusted, or whose
rendered image is blank, gets its text here and never travels to the model actors.

The trust rules (``trust_text_layer``), each a reason to send the page to the model instead:
- ``no_text_layer``: the renderer offers none (image files; a renderer without text extraction);
- ``unmapped_font``: a composite (Type0, Identity) font without a ToUnicode map: its text is glyph ids;
- ``full_page_image``: an image covers 90% of the page: a scan, whose text is in the pixels even when an
  invisible OCR layer lies on top (unless ``trust_ocr_layer``: then that layer counts as visible text);
- ``hidden_text``: more than ``max_hidden_char_fraction`` of the characters are white, fully transparent,
  invisible (render mode 3) or outside the page;
- ``bad_chars``: more than ``max_bad_char_fraction`` are U+FFFD, private-use or control characters;
- ``sparse``: fewer visible characters than ``min_chars`` or ``min_chars_per_in2`` times the page's area.

The text of a trusted page is PyMuPDF's sorted extraction (blocks top-left to bottom-right), normalised by
``normalise_layout``: trailing spaces dropped, runs of blank lines collapsed to one, no blank lines at the ends.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from pipeline.config import RouteOptions

FULL_PAGE_IMAGE = 0.9  # share of the page an image must cover to make it a scan
WHITE = 0.95  # every colour component at least this light (CMYK: at most 1 - this)
CELLS = 256  # blank detection: cells along the page's longest side


@dataclass(frozen=True)
class TextLayer:
    """What the routing rules need from a page's text layer; renderer-neutral (see documents.py)."""

    text: str  # the layer's text in reading order (before normalise_layout)
    width_pt: float
    height_pt: float
    chars: int  # non-space characters drawn, wherever and however
    hidden_chars: int  # of those: white, fully transparent, or outside the page (not invisible-mode ones)
    invisible_chars: int  # of those: render mode 3 (or other never-painted text): what OCR layers use
    bad_chars: int  # of those: U+FFFD, private-use, control
    unmapped_fonts: int  # Type0 Identity fonts with no ToUnicode map
    image_coverage: float  # share of the page covered by its largest image


@dataclass(frozen=True)
class Verdict:
    trusted: bool
    reason: str  # "trusted", or the first rule that failed (see the module docstring)


def is_bad_char(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return ch == "\ufffd" or cat == "Co" or (cat == "Cc" and ch not in "\t\n\r")


def trust_text_layer(layer: TextLayer | None, opts: RouteOptions) -> Verdict:
    """Whether a page's text layer can stand in for the model's reading, and if not, why."""
    if layer is None:
        return Verdict(False, "no_text_layer")
    if layer.unmapped_fonts:
        return Verdict(False, "unmapped_font")
    if layer.image_coverage >= FULL_PAGE_IMAGE and not opts.trust_ocr_layer:
        return Verdict(False, "full_page_image")
    invisible_ok = opts.trust_ocr_layer and layer.image_coverage >= FULL_PAGE_IMAGE
    hidden = layer.hidden_chars + (0 if invisible_ok else layer.invisible_chars)
    if layer.chars and hidden / layer.chars > opts.max_hidden_char_fraction:
        return Verdict(False, "hidden_text")
    if layer.chars and layer.bad_chars / layer.chars > opts.max_bad_char_fraction:
        return Verdict(False, "bad_chars")
    area_in2 = layer.width_pt * layer.height_pt / 72**2
    if layer.chars - hidden < max(opts.min_chars, opts.min_chars_per_in2 * area_in2):
        return Verdict(False, "sparse")
    return Verdict(True, "trusted")


def normalise_layout(text: str) -> str:
    """A text layer's text as pages carry it: trailing spaces dropped, blank-line runs collapsed, ends trimmed."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def pymupdf_text_layer(page) -> TextLayer:
    """A PyMuPDF page's text layer: sorted text, and per-character facts from its text trace."""
    import pymupdf

    rect = page.rect
    chars = hidden = invisible = bad = 0
    for span in page.get_texttrace():
        drawn = [chr(c[0]) for c in span["chars"] if c[0] >= 0 and not chr(c[0]).isspace()]
        chars += len(drawn)
        bad += sum(1 for ch in drawn if is_bad_char(ch))
        if span["type"] == 3:  # text render mode 3: laid out, never painted
            invisible += len(drawn)
        elif (span["opacity"] == 0 or _is_white(span["colorspace"], span["color"])
              or not pymupdf.Rect(span["bbox"]).intersects(rect)):
            hidden += len(drawn)
    area = abs(rect) or 1.0
    coverage = max((abs(pymupdf.Rect(bbox) & rect) / area for kind, bbox in page.get_bboxlog()
                    if kind in ("fill-image", "fill-imgmask")), default=0.0)
    return TextLayer(
        text=page.get_text("text", sort=True),
        width_pt=rect.width,
        height_pt=rect.height,
        chars=chars,
        hidden_chars=hidden,
        invisible_chars=invisible,
        bad_chars=bad,
        unmapped_fonts=_unmapped_fonts(page),
        image_coverage=coverage,
    )


def _is_white(colorspace: int, color) -> bool:
    if not color:
        return False
    if colorspace == 4:  # CMYK: no ink
        return all(c <= 1 - WHITE for c in color)
    return all(c >= WHITE for c in color)


def _unmapped_fonts(page) -> int:
    doc, count = page.parent, 0
    for xref, _ext, ftype, _base, _name, encoding, *_ in page.get_fonts():
        if ftype == "Type0" and encoding.startswith("Identity") and xref:
            count += doc.xref_get_key(xref, "ToUnicode")[0] == "null"
    return count


def is_blank(pixels, opts: RouteOptions) -> bool:
    """Whether a rendered page (an (H, W, 3) uint8 array) is blank: near-uniform once averaged over small
    cells (scanner noise evens out), outside a margin (scanner edges and faint borders), allowing a few
    ink cells (dust). Light-on-dark counts as ink too, so a uniformly black page is blank."""
    import numpy as np

    h, w = pixels.shape[:2]
    mh, mw = int(h * opts.blank_margin), int(w * opts.blank_margin)
    if h - 2 * mh >= 1 and w - 2 * mw >= 1:
        pixels = pixels[mh : h - mh, mw : w - mw]
        h, w = pixels.shape[:2]
    cell = max(1, round(max(h, w) / CELLS))
    h, w = max(cell, h - h % cell), max(cell, w - w % cell)
    gray = pixels[:h, :w].astype(np.uint16).sum(axis=2)  # 0..765
    if gray.shape[0] < cell or gray.shape[1] < cell:  # smaller than one cell: uniform by definition
        return True
    cells = gray.reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3)) / 3.0
    ink = np.abs(cells - np.median(cells)) > opts.blank_ink_delta
    return float(ink.mean()) <= opts.blank_max_ink_fraction
