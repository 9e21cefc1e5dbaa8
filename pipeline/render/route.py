"""Which pages need the model: the PDF text layer's trust rules, and blank-page detection.

Pure functions, decided per page in the render stage. A page whose text layer is trusted, or whose
rendered image is blank, gets its text here and never travels to the model actors.

The trust rules (``trust_text_layer``), each a reason to send the page to the model instead:
- ``no_text_layer``: the renderer offers none (image files; a renderer without text extraction);
- ``unmapped_font``: a composite (Type0, Identity) font without a ToUnicode map: its text is glyph ids;
- ``full_page_image``: an image covers 90% of the page: a scan, whose text is in the pixels even when an
  invisible OCR layer lies on top (unless ``trust_ocr_layer``: then that layer counts as visible text);
- ``hidden_text``: more than ``max_hidden_char_fraction`` of the characters are white (on a light background: white
  on a dark band or picture is read), fully transparent or invisible (render mode 3); text outside the page is
  clipped away, so a layer that lies there is ``sparse``;
- ``bad_chars``: more than ``max_bad_char_fraction`` are U+FFFD, private-use or control characters;
- what the words say (scripts.text_faults; more than ``max_garbled_word_fraction`` of them, at least two):
  ``broken_font_map`` ("(cid:NN)", letters of a right-to-left script and another inside one word), ``mojibake``
  (UTF-8 read as Latin-1 or cp1252); and for right-to-left text ``presentation_forms`` (most of it stored as shaped
  glyphs) or ``rtl_visual_order`` (words stored backwards, as visual-order producers write them);
- ``sparse``: fewer visible characters than ``min_chars`` or ``min_chars_per_in2`` times the page's area;
- ``formulas``: more than ``max_math_chars`` formula characters (text_layer.math_char_count: letters and digits in
  math fonts such as CMMI, CMSY, CMEX, Symbol, STIX Math; math symbols beyond prose's): no text layer gives LaTeX,
  the model does.

The text of a trusted page is its Markdown (pipeline/render/text_layer.py: tables, headings, columns in reading order,
running heads and page numbers dropped, characters normalised), the format the model is asked to write.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Callable

from docpipe.config import RouteOptions
from docpipe.render.scripts import Faults, fault_reason
from docpipe.render.text_layer import normalise_layout  # noqa: F401  (re-exported: how pages carry text)

FULL_PAGE_IMAGE = 0.9  # share of the page an image must cover to make it a scan
WHITE = 0.95  # every sRGB component at least this light
CELLS = 256  # blank detection: cells along the page's longest side
DARK = 0.6  # white text is visible on a background whose grey level is below this (contrast about 3:1 and more)
DARK_ZOOM = 0.5  # pixels per point of the render that finds white text's background


@dataclass(frozen=True)
class TextLayer:
    """What the routing rules need from a page's text layer; renderer-neutral (see documents.py)."""

    # The layer's text, or (PyMuPDF) how to make its Markdown: made by page_text only for a page read from its
    # layer, since the conversion is most of the layer's cost and a page the model reads never needs it.
    text: str | Callable[[], str]
    width_pt: float
    height_pt: float
    chars: int  # non-space characters drawn, wherever and however
    hidden_chars: int  # of those: drawn in white
    invisible_chars: int  # of those: never painted (render mode 3, as OCR layers are, or fully transparent)
    bad_chars: int  # of those: U+FFFD, private-use, control
    unmapped_fonts: int  # Type0 Identity fonts with no ToUnicode map
    image_coverage: float  # share of the page covered by its largest image
    math_chars: int = 0  # of those: in math fonts, or math symbols (text_layer.math_char_count)
    faults: Faults | None = None  # what its words say of its font maps and order (scripts.text_faults)

    def page_text(self) -> str:
        """The layer's text; PyMuPDF's Markdown is made here (ConversionError if the converter fails)."""
        return self.text() if callable(self.text) else self.text


class ConversionError(Exception):
    """The Markdown conversion of a page's text layer failed (text_layer.page_markdown: PyMuPDF's table finder and
    text extraction on whatever a PDF holds, where third-party code raises even TypeError on an odd page). The
    page goes to the model (route_reason text_layer_error) rather than becoming an error row."""


@dataclass(frozen=True)
class Verdict:
    trusted: bool
    reason: str  # "trusted", or the first rule that failed (see the module docstring): a page's route_reason


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
    if layer.faults is not None and (reason := fault_reason(layer.faults, opts.max_garbled_word_fraction)):
        return Verdict(False, reason)
    area_in2 = layer.width_pt * layer.height_pt / 72**2
    if layer.chars - hidden < max(opts.min_chars, opts.min_chars_per_in2 * area_in2):
        return Verdict(False, "sparse")
    if layer.math_chars > opts.max_math_chars:
        return Verdict(False, "formulas")
    return Verdict(True, "trusted")


def pymupdf_text_layer(page, running=None) -> TextLayer:
    """A PyMuPDF page's text layer, from one text page: per-span facts, and how to make its Markdown
    (text_layer.page_markdown; ``running``: the document's text_layer.RunningLines). Text outside the page is
    clipped away by MuPDF, so it is neither counted nor kept. Right-to-left lines are read in logical order
    (scripts.logical_blocks), and the layer's script faults counted on that text (scripts.text_faults)."""
    import pymupdf

    from docpipe.render.scripts import logical_blocks, text_faults
    from docpipe.render.text_layer import math_char_count, page_markdown

    tp = page.get_textpage(flags=pymupdf.TEXTFLAGS_TEXT)
    blocks = tp.extractDICT()["blocks"]
    stored = None
    if (fixed := logical_blocks(page, blocks)) is not None:
        stored = _text(blocks)  # as the layer maps it, for the presentation-forms count
        tp, blocks = fixed
    chars = hidden = invisible = bad = math = 0
    white: list[tuple[tuple, int]] = []  # white spans: (bbox, characters)
    for block in blocks:
        for line in block.get("lines", ()):
            for span in line["spans"]:
                drawn = [ch for ch in span["text"] if not ch.isspace()]
                chars += len(drawn)
                bad += sum(1 for ch in drawn if is_bad_char(ch))
                math += math_char_count(span["text"], span["font"])
                if span.get("alpha", 255) == 0:  # render mode 3 (OCR layers) or fully transparent
                    invisible += len(drawn)
                elif _is_white(span["color"]) and drawn:
                    white.append((tuple(span["bbox"]), len(drawn)))
    hidden = sum(n for (_, n), shown in zip(white, _on_dark(page, [b for b, _ in white])) if not shown)
    rect = page.rect
    area = abs(rect) or 1.0
    # The log's boxes are in unrotated coordinates, page.rect in rotated ones: turn the boxes with the page, or a
    # /Rotate 90 full-page scan covers only a square of its page.
    coverage = max((abs(pymupdf.Rect(bbox) * page.rotation_matrix & rect) / area for kind, bbox in page.get_bboxlog()
                    if kind in ("fill-image", "fill-imgmask")), default=0.0)

    def markdown() -> str:
        try:
            return page_markdown(page, tp, blocks, running)
        except Exception as exc:  # only the converter: a mistake in the facts above still surfaces as one
            raise ConversionError(f"{type(exc).__name__}: {exc}") from exc

    return TextLayer(
        text=markdown,
        width_pt=rect.width,
        height_pt=rect.height,
        chars=chars,
        hidden_chars=hidden,
        invisible_chars=invisible,
        bad_chars=bad,
        unmapped_fonts=_unmapped_fonts(page),
        image_coverage=coverage,
        math_chars=math,
        faults=text_faults(_text(blocks), stored),
    )


def _text(blocks: list) -> str:
    return "\n".join("".join(s["text"] for s in ln["spans"]) for b in blocks for ln in b.get("lines", ()))


def _is_white(srgb: int) -> bool:
    return all((srgb >> shift) & 0xFF >= WHITE * 255 for shift in (16, 8, 0))


def _on_dark(page, boxes: list[tuple]) -> list[bool]:
    """For each box (white text's, in page.rect's frame as extractDICT gives them), whether what is drawn behind it
    is dark enough for white text to be read: a table's heading band, a title bar, a photograph. Measured on the
    page as drawn (a coarse grey render of the boxes' area): the median of a box's pixels is its background, since
    glyphs cover the lesser part of it."""
    if not boxes:
        return []
    import numpy as np
    import pymupdf

    clip = pymupdf.Rect(boxes[0])
    for box in boxes[1:]:
        clip |= box
    clip &= page.rect
    if clip.is_empty:
        return [False] * len(boxes)
    pix = page.get_pixmap(matrix=pymupdf.Matrix(DARK_ZOOM, DARK_ZOOM), clip=clip, colorspace=pymupdf.csGRAY,
                          alpha=False, annots=False)
    grey = np.frombuffer(pix.samples, dtype=np.uint8).reshape(pix.height, pix.stride)[:, : pix.width]
    shown = []
    for x0, y0, x1, y1 in boxes:
        cols = slice(max(0, int((x0 - clip.x0) * DARK_ZOOM)), max(1, int(np.ceil((x1 - clip.x0) * DARK_ZOOM))))
        rows = slice(max(0, int((y0 - clip.y0) * DARK_ZOOM)), max(1, int(np.ceil((y1 - clip.y0) * DARK_ZOOM))))
        cell = grey[rows, cols]
        shown.append(bool(cell.size) and float(np.median(cell)) < DARK * 255)
    return shown


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
    hc, wc = h // cell, w // cell
    if not hc or not wc:  # smaller than one cell: uniform by definition
        return True
    block = pixels[: hc * cell, : wc * cell]  # a view: reshaping it below needs no copy
    # Integer sums, rows of a cell first (in uint16: at most cell * 255), then its columns and channels: a
    # float copy of a 1960 px page cost ten times more.
    rows = block.reshape(hc, cell, wc * cell * 3).sum(axis=1, dtype=np.uint16)
    cells = rows.reshape(hc, wc, cell * 3).sum(axis=2, dtype=np.uint32) / (cell * cell * 3)
    ink = np.abs(cells - np.median(cells)) > opts.blank_ink_delta
    return float(ink.mean()) <= opts.blank_max_ink_fraction
