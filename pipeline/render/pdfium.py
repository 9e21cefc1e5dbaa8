"""PDFium (pypdfium2), the second PDF renderer: for what MuPDF cannot open, finds no pages in, asks a
password for, or fails on.

Real-world files split the two engines: a page tree with a wrong /Count is empty (or an error) to MuPDF
and whole to PDFium; a document whose only encrypted part is an attachment needs a password in MuPDF and
none in PDFium. Pages come out at the size MuPDF would give them, under the same pixel cap, so a page
reads the same whichever engine drew it.
"""

from __future__ import annotations

from docpipe.config import RenderOptions
from docpipe.errors import RowError, describe
from docpipe.render.pixels import RenderedPage, encode_raw, pdf_pixels, pdf_zoom
from docpipe.schemas import ErrorType

# FPDF_GetLastError codes. PDFium sets none when it refuses a document for having no pages (no page tree,
# or an empty one), so the code is first set to FILE_ERROR, which a load from memory never sets itself.
FILE_ERROR, PASSWORD_ERROR = 2, 4


class PdfiumOpenError(Exception):
    """PDFium could not open the document; ``what`` says why: encrypted (needs a password), empty (no pages)
    or corrupt."""

    def __init__(self, what: str, message: str):
        super().__init__(message)
        self.what = what


def open_pdfium(data: bytes, password: str | None = None):
    """The document PDFium makes of ``data`` (with ``password``, for an encrypted one MuPDF opened with it), or
    PdfiumOpenError."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as c

    c.FPDF_LoadDocument(b"", None)  # fails with FILE_ERROR: see above
    try:
        pdf = pdfium.PdfDocument(data, password=password)
    except pdfium.PdfiumError as exc:
        if exc.err_code == FILE_ERROR:
            raise PdfiumOpenError("empty", "no pages") from None
        raise PdfiumOpenError("encrypted" if exc.err_code == PASSWORD_ERROR else "corrupt", describe(exc)) from None
    if len(pdf) == 0:
        raise PdfiumOpenError("empty", "no pages")
    try:
        pdf.init_forms()  # before any page is loaded: form fields are drawn as MuPDF draws them
    except pdfium.PdfiumError:
        pass  # a broken form environment costs the fields, not the page
    return pdf


class PdfiumPage:
    """Render callable for one page of a PDFium document, as documents._PdfPage is for MuPDF."""

    renderer = "pdfium"

    def __init__(self, pdf, index: int):
        self.pdf, self.index = pdf, index

    def __call__(self, opts: RenderOptions, longest_edge: int) -> RenderedPage:
        page = self._page()
        try:
            return render_pdfium_page(page, opts, longest_edge)
        finally:
            page.close()

    def text(self) -> str:
        """The page's text layer as PDFium reads it (line breaks as \\n)."""
        page = self._page()
        try:
            textpage = page.get_textpage()
            try:
                return textpage.get_text_range().replace("\r\n", "\n")
            finally:
                textpage.close()
        finally:
            page.close()

    def text_layer(self):
        """PDFium's view of the page's text layer for the routing rules (route.TextLayer), so a page PDFium
        drew is judged, and answered, by PDFium's text. PDFium names no font's ToUnicode map, so an unmapped
        font shows only through the bad-character rule."""
        import ctypes

        import pypdfium2.raw as c

        from docpipe.render.route import TextLayer, is_bad_char
        from docpipe.render.scripts import has_rtl, text_faults

        page = self._page()
        try:
            width, height = page.get_size()
            textpage = page.get_textpage()
            try:
                text = textpage.get_text_range().replace("\r\n", "\n")
                if has_rtl(text):
                    text = _logical_lines(textpage)
                chars = invisible = bad = 0
                white: list[tuple] = []  # white characters' boxes
                rgba = [ctypes.c_uint() for _ in range(4)]
                for i in range(textpage.count_chars()):
                    ch = chr(c.FPDFText_GetUnicode(textpage, i))
                    if ch.isspace():
                        continue
                    chars += 1
                    bad += is_bad_char(ch)
                    mode = c.FPDFTextObj_GetTextRenderMode(c.FPDFText_GetTextObject(textpage, i))
                    ok = c.FPDFText_GetFillColor(textpage, i, *(ctypes.byref(v) for v in rgba))
                    r, g, b, a = (v.value for v in rgba)
                    if mode == c.FPDF_TEXTRENDERMODE_INVISIBLE or (ok and a == 0):
                        invisible += 1
                    elif ok and min(r, g, b) >= 0.95 * 255:
                        white.append(_char_box(textpage, i))
                hidden = sum(not shown for shown in _on_dark(page, white))
            finally:
                textpage.close()
            # Image bounds are in unrotated page space, as the crop box is: measured there, /Rotate changes nothing.
            x0, y0, x1, y1 = page.get_cropbox()
            area = (x1 - x0) * (y1 - y0) or 1.0
            images = [_page_bounds(obj) for obj in page.get_objects(filter=[c.FPDF_PAGEOBJ_IMAGE])]
            coverage = max((max(0.0, min(r, x1) - max(left, x0)) * max(0.0, min(t, y1) - max(b, y0)) / area
                            for left, b, r, t in images), default=0.0)
            return TextLayer(text=text, width_pt=width, height_pt=height, chars=chars, hidden_chars=hidden,
                             invisible_chars=invisible, bad_chars=bad, unmapped_fonts=0,
                             image_coverage=max(0.0, coverage), faults=text_faults(text))
        finally:
            page.close()

    def _page(self):
        import pypdfium2 as pdfium

        try:
            return self.pdf[self.index]
        except pdfium.PdfiumError as exc:
            raise RowError(ErrorType.render_error, f"cannot load page {self.index + 1}: {describe(exc)}") from None


def _char_box(textpage, i: int) -> tuple[float, float, float, float]:
    """A character's box (left, bottom, right, top: its ink) in unrotated page space."""
    import ctypes

    import pypdfium2.raw as c

    box = [ctypes.c_double() for _ in range(4)]
    c.FPDFText_GetCharBox(textpage, i, *(ctypes.byref(v) for v in box))
    left, right, bottom, top = (v.value for v in box)
    return left, bottom, right, top


def _on_dark(page, boxes: list[tuple]) -> list[bool]:
    """For each white character's box, whether it is drawn on a dark background (route._on_dark, for PDFium): the
    median of a coarse grey render around it, the box grown by its height on every side, since a box holds the
    character's ink and little else."""
    if not boxes:
        return []
    import ctypes

    import numpy as np
    import pypdfium2.raw as c

    from docpipe.render.route import DARK, DARK_ZOOM

    bitmap = page.render(scale=DARK_ZOOM, grayscale=True, may_draw_forms=False)
    grey = bitmap.to_numpy().reshape(bitmap.height, bitmap.width, -1)[:, :, 0]
    x, y = ctypes.c_int(), ctypes.c_int()

    def device(px: float, py: float) -> tuple[int, int]:  # page space to the render's pixels, /Rotate applied
        c.FPDF_PageToDevice(page, 0, 0, bitmap.width, bitmap.height, 0, px, py, ctypes.byref(x), ctypes.byref(y))
        return x.value, y.value

    shown = []
    for left, bottom, right, top in boxes:
        pad = top - bottom
        (ax, ay), (bx, by) = device(left - pad, bottom - pad), device(right + pad, top + pad)
        cell = grey[max(0, min(ay, by)) : max(ay, by) + 1, max(0, min(ax, bx)) : max(ax, bx) + 1]
        shown.append(bool(cell.size) and float(np.median(cell)) < DARK * 255)
    bitmap.close()
    return shown


def _logical_lines(textpage) -> str:
    """The text page's text, line by line (PDFium's line breaks), each right-to-left line rebuilt from its characters'
    boxes in logical order (scripts.logical_text): PDFium gives such lines' words alternately forwards and backwards."""
    import pypdfium2.raw as c

    from docpipe.render.scripts import logical_text

    lines: list[list] = [[]]
    for i in range(textpage.count_chars()):
        ch = chr(c.FPDFText_GetUnicode(textpage, i))
        if ch == "\n":
            lines.append([])
        elif ch != "\r":
            lines[-1].append((ch, _char_box(textpage, i), c.FPDFText_GetFontSize(textpage, i)))
    return "\n".join(logical_text(line) for line in lines)


def _page_bounds(obj) -> tuple[float, float, float, float]:
    """A page object's bounds on the page. PDFium gives an object inside a Form XObject its bounds in the form's
    space: each enclosing form's matrix takes them to its parent's (a full-page scan drawn through a form that
    scales it by 2 measured a quarter of the page)."""
    x0, y0, x1, y1 = obj.get_bounds()
    corners = [(x0, y0), (x1, y0), (x0, y1), (x1, y1)]
    form = obj.container
    while form is not None:
        matrix = form.get_matrix()
        corners = [matrix.on_point(x, y) for x, y in corners]
        form = form.container
    xs, ys = [x for x, _ in corners], [y for _, y in corners]
    return min(xs), min(ys), max(xs), max(ys)


def render_pdfium_page(page, opts: RenderOptions, longest_edge: int) -> RenderedPage:
    import pypdfium2 as pdfium
    import pypdfium2.raw as c

    width, height = page.get_size()  # points, the page's /Rotate applied, as MuPDF's page.rect
    zoom = pdf_zoom(width, height, opts, longest_edge)
    w, h = pdf_pixels(width, zoom), pdf_pixels(height, zoom)
    # Our own bitmap, not page.render(): it sizes by plain ceil and is a pixel wider than MuPDF on many pages.
    bitmap = pdfium.PdfBitmap.new_native(w, h, format=c.FPDFBitmap_BGR, rev_byteorder=True)
    try:
        c.FPDFBitmap_FillRect(bitmap, 0, 0, w, h, 0xFFFFFFFF)  # white paper, as MuPDF's alpha=False pixmaps
        flags = c.FPDF_ANNOT | c.FPDF_REVERSE_BYTE_ORDER  # RGB byte order, annotations drawn (as MuPDF)
        c.FPDF_RenderPageBitmap(bitmap, page, 0, 0, w, h, 0, flags)
        if page.formenv:
            c.FPDF_FFLDraw(page.formenv, bitmap, page, 0, 0, w, h, 0, flags)
        samples = _packed_rgb(bitmap, w, h)
    finally:
        bitmap.close()
    if opts.image_format == "raw":
        return encode_raw(samples, w, h, opts, lambda: _encoded(samples, w, h, "jpeg", opts))
    return RenderedPage(_encoded(samples, w, h, opts.image_format, opts), w, h, opts.image_format)


def _packed_rgb(bitmap, w: int, h: int) -> bytes:
    """Row-major RGB without the row padding PDFium adds (rows are 4-byte aligned)."""
    import numpy as np

    buf = np.ctypeslib.as_array(bitmap.buffer).reshape(h, bitmap.stride)
    return buf[:, : w * 3].tobytes()


def _encoded(samples: bytes, w: int, h: int, fmt: str, opts: RenderOptions) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    img = Image.frombuffer("RGB", (w, h), samples, "raw", "RGB", 0, 1)
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=opts.jpeg_quality)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
