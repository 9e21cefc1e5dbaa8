"""Opening a document's bytes as pages: MuPDF for PDFs, PDFium when MuPDF cannot open or render one, Pillow for images
(one page per frame). Each page renders itself on demand, so pages are drawn one at a time.
"""

from __future__ import annotations

import io
import re
from typing import Iterator

from docpipe.config import RenderOptions
from docpipe.errors import RowError, describe
from docpipe.render.pixels import render_image, render_pdf_page
from docpipe.schemas import ErrorType


PDF = "application/pdf"


IMAGE_TYPES = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"II*\x00": "image/tiff",
    b"MM\x00*": "image/tiff",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
    b"BM": "image/bmp",
}


def open_pages(data: bytes, media_type: str | None, passwords: list[tuple[str, str]] = ()) -> Iterator:
    """Generator: first yields the page count, the renderer that found the pages and whether MuPDF repaired the
    file (None where MuPDF did not open it), then one render callable per page. ``passwords``: (where from,
    password) to try on an encrypted PDF, in order."""
    if not data:
        raise RowError(ErrorType.empty_file, "file is empty (0 bytes)")
    if media_type == PDF:
        yield from _pdf_pages(data, passwords)
    elif media_type is not None:
        yield from _image_frames(data, media_type)
    else:
        raise RowError(ErrorType.unsupported_media_type, f"not a PDF or a supported image (starts with {data[:8]!r})")


def _pdf_pages(data: bytes, passwords: list[tuple[str, str]] = ()) -> Iterator:
    """MuPDF's pages; PDFium's (docpipe.render.pdfium) for a document MuPDF cannot open, finds no pages in or asks a
    password for (that none of ``passwords`` gives), and for each page MuPDF fails on."""
    pdf, page_count, problem, password = _open_mupdf(data, passwords)
    if problem is not None:
        yield from _pdfium_pages(data, *problem, tried=bool(passwords))
        return
    yield page_count, _PdfPage.renderer, bool(pdf.is_repaired)
    fallback = _PdfiumFallback(data, password)
    from docpipe.render.text_layer import RunningLines

    running = RunningLines(pdf)  # running heads and page numbers, found across neighbouring pages
    for index in range(page_count):
        yield _WithFallback(_PdfPage(pdf, index, running), lambda index=index: fallback.page(index))


def _open_mupdf(data: bytes, passwords: list[tuple[str, str]] = ()):
    """(document, page count, None, the password that opened it or None), or (None, 0, (what, why), None) with what
    one of corrupt, encrypted, empty."""
    import pymupdf

    pymupdf.TOOLS.mupdf_display_errors(False)  # MuPDF's repair chatter would flood worker logs
    password = None
    try:
        pdf = pymupdf.open(stream=data, filetype="pdf")
        if pdf.needs_pass:
            password = next((pw for _, pw in passwords if pdf.authenticate(pw)), None)
            if password is None:
                # where each password came from, never the password itself
                tried = f"none of the passwords tried opens it ({', '.join(w for w, _ in passwords)})"
                return None, 0, ("encrypted", tried if passwords else "needs a password"), None
        page_count = pdf.page_count  # raises on some damaged page trees ("Invalid number of pages")
    except Exception as exc:
        return None, 0, ("corrupt", describe(exc)), None
    if page_count == 0:
        return None, 0, ("empty", "no pages"), None
    return pdf, page_count, None, password


def _pdfium_pages(data: bytes, mupdf_what: str, mupdf_why: str, tried: bool = False) -> Iterator:
    """PDFium's pages of a document MuPDF gave up on; if PDFium gives none either, the error both agree on."""
    from docpipe.render.pdfium import PdfiumOpenError, PdfiumPage, open_pdfium

    try:
        pdf = open_pdfium(data)
    except PdfiumOpenError as exc:
        what, why = exc.what, str(exc)
    except Exception as exc:
        what, why = "corrupt", describe(exc)
    else:
        yield len(pdf), PdfiumPage.renderer, None
        for index in range(len(pdf)):
            yield PdfiumPage(pdf, index)
        return
    reasons = f"MuPDF: {mupdf_why}; PDFium: {why}"
    if mupdf_what == what == "empty":
        raise RowError(ErrorType.empty_document, f"PDF has no pages ({reasons})")
    if "encrypted" in (mupdf_what, what):
        if tried:
            raise RowError(ErrorType.encrypted_document, f"PDF is encrypted and the password given does not open "
                           f"it ({reasons})")
        raise RowError(ErrorType.encrypted_document, f"PDF is encrypted and needs a password ({reasons}): give "
                       "one with --password or --passwords")
    raise RowError(ErrorType.corrupt_document, f"cannot open PDF: {reasons}")


class _PdfiumFallback:
    """The PDFium copy of a document MuPDF opened, made the first time MuPDF fails on one of its pages."""

    def __init__(self, data: bytes, password: str | None = None):
        self.data, self.password = data, password
        self.pdf, self.error = None, None  # error: why PDFium could not open it

    def page(self, index: int):
        from docpipe.render.pdfium import PdfiumOpenError, PdfiumPage, open_pdfium

        if self.pdf is None and self.error is None:
            try:
                self.pdf = open_pdfium(self.data, self.password)
            except Exception as exc:
                why = str(exc) if isinstance(exc, PdfiumOpenError) else describe(exc)
                self.error = f"cannot open the document: {why}"
        if self.error is not None:
            raise RowError(ErrorType.render_error, self.error)
        return PdfiumPage(self.pdf, index)


class _WithFallback:
    """A MuPDF page that PDFium draws if MuPDF fails on it; from then on it reads as the PDFium page
    (``renderer``, its text layer), since that is where the page's pixels came from."""

    def __init__(self, page, fallback):
        self.page, self._fallback = page, fallback

    def __call__(self, opts: RenderOptions, longest_edge: int):
        try:
            return self.page(opts, longest_edge)
        except RowError as exc:
            error_type, first = exc.error_type, exc.message
        except Exception as exc:
            error_type, first = ErrorType.render_error, describe(exc)
        try:
            second = self._fallback()
            rendered = second(opts, longest_edge)
        except Exception as exc:
            why = exc.message if isinstance(exc, RowError) else describe(exc)
            raise RowError(error_type, f"MuPDF: {first}; PDFium: {why}") from None
        self.page = second
        return rendered

    def __getattr__(self, name):
        return getattr(self.page, name)


# MuPDF's warnings that mean part of a page's content was not drawn: a content stream it could not load (a
# truncated file it repaired), data cut short, syntax it gave up on. Other warnings (a font substituted, say) leave
# the content whole.
_CONTENT_LOST = re.compile(r"cannot load content stream|premature end of data|page may not be correct|"
                           r"unexpected end of|read error|cannot find object|object out of range|truncated", re.I)


def content_lost(warnings: str) -> str | None:
    """The lines of MuPDF's warnings that say content was lost, de-duplicated, joined; None when none do."""
    lines = [ln.strip() for ln in warnings.splitlines() if _CONTENT_LOST.search(ln)]
    return "; ".join(dict.fromkeys(lines)) or None


class _PdfPage:
    """A page callable: called, it renders; every page class also has ``text_layer()`` for routing. After
    rendering, ``damage`` holds MuPDF's warnings on content of the page it could not load (content_lost), or None."""

    renderer = "pymupdf"
    damage = None

    def __init__(self, pdf, index: int, running=None):
        self.pdf, self.index, self.running = pdf, index, running  # running: the document's text_layer.RunningLines

    def text_layer(self):
        """This renderer's view of the page's text layer (route.TextLayer), or None if it offers none."""
        from docpipe.render.route import pymupdf_text_layer

        return pymupdf_text_layer(self.pdf.load_page(self.index), self.running)

    def __call__(self, opts: RenderOptions, longest_edge: int):
        import pymupdf

        pymupdf.TOOLS.mupdf_warnings(reset=True)  # MuPDF keeps one store of warnings for the process: this page's
        page = self.pdf.load_page(self.index)
        try:
            rendered = render_pdf_page(page, opts, longest_edge)  # drawing interprets the whole content
            self.damage = content_lost(pymupdf.TOOLS.mupdf_warnings(reset=True))
            return rendered
        finally:
            del page  # release the page's display list before the next one


def _image_frames(data: bytes, media_type: str) -> Iterator:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        frames = getattr(img, "n_frames", 1)  # multi-page TIFF, animated GIF/WebP: each frame is a page
    except Image.DecompressionBombError as exc:  # Pillow checks the header's size before decoding anything
        raise RowError(ErrorType.image_too_large, describe(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RowError(ErrorType.corrupt_document, f"cannot open {media_type}: {describe(exc)}") from None
    yield frames, _ImageFrame.renderer, None
    for index in range(frames):
        yield _ImageFrame(img, index)


class _ImageFrame:
    renderer = "pillow"

    def __init__(self, img, index: int):
        self.img, self.index = img, index

    def text_layer(self):
        return None  # pixels only: the model reads it

    def __call__(self, opts: RenderOptions, longest_edge: int):
        from PIL import Image, ImageOps

        w, h = self.img.size
        if w * h > opts.max_pixels * 4:
            # Decoding would allocate a huge buffer; scaling after decode is too late.
            raise RowError(ErrorType.image_too_large,
                           f"image is {w}x{h} pixels, over 4 x max_pixels ({opts.max_pixels})")
        try:
            self.img.seek(self.index)
            frame = ImageOps.exif_transpose(self.img)  # scanners and phones store rotation in EXIF
            return render_image(frame, opts, longest_edge)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise RowError(ErrorType.image_decode_error, describe(exc)) from None
