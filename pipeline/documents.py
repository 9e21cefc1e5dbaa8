"""Open a document's bytes and expand it, lazily, into page records.

``expand_document`` is the read-and-render stage: it yields one ``document`` record
(what was found on opening) and then one ``page`` record per page, one page at a time,
so a 2,000-page PDF is never held whole. It never raises for a bad document: failures
become records with an error_type.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.config import RenderOptions, RouteOptions, StorageOptions
from pipeline.errors import RowError, describe, reraise_if_fail_fast
from pipeline.records import CHUNK, DOCUMENT, PAGE
from pipeline.render import render_image, render_pdf_page
from pipeline.storage import read_bytes

PDF = "application/pdf"
SAME_BYTES = "the same bytes are already ok in this output"
STARTUP_S = 120  # for a render process to start
IMAGE_TYPES = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"II*\x00": "image/tiff",
    b"MM\x00*": "image/tiff",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
    b"BM": "image/bmp",
}


def sniff_media_type(data: bytes) -> str | None:
    """Media type from the leading bytes; the file name is not trusted."""
    if b"%PDF-" in data[:1024]:  # readers accept junk before the header
        return PDF
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, media_type in IMAGE_TYPES.items():
        if data.startswith(magic):
            return media_type
    return None


def expand_document(
    source_uri: str,
    opts: RenderOptions,
    longest_edge: int,
    storage: StorageOptions | None = None,
    ocr: bool = True,
    chunk_pages: int | None = None,
    skip_ids: frozenset[str] = frozenset(),
    route: RouteOptions | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the document record, its page records (with images when ``ocr``) and, when ``chunk_pages`` is
    set, one chunk record per ``chunk_pages`` pages carrying their images for extraction. With ``route``
    (and ``ocr``), a page answered by its text layer or found blank carries its text and no image."""
    doc: dict[str, Any] = {"kind": DOCUMENT, "source_uri": source_uri, "status": "ok"}
    try:
        data = read_bytes(source_uri, storage)
    except OSError as exc:  # after the filesystem's own retries: missing, denied, or still failing
        reraise_if_fail_fast()
        yield {**doc, "status": "error", "error_type": "read_error", "error_message": describe(exc)}
        return
    doc.update(doc_id=hashlib.sha256(data).hexdigest(), size_bytes=len(data), media_type=sniff_media_type(data))
    if doc["doc_id"] in skip_ids:  # resume: the same bytes are already ok in this output, under some URI
        yield {**doc, "status": "skipped", "error_message": SAME_BYTES}
        return
    try:
        pages = _open(data, doc["media_type"])
        page_count, renderer = next(pages)
    except RowError as exc:
        reraise_if_fail_fast()
        yield {**doc, "status": "error", "error_type": exc.error_type, "error_message": exc.message}
        return
    except Exception as exc:  # a reader's own failure while opening, not one it reported: the file is at fault
        reraise_if_fail_fast()
        yield {**doc, "status": "error", "error_type": "corrupt_document",
               "error_message": f"cannot open: {describe(exc)}"}
        return
    del data  # the opened document keeps what it needs
    chunk_count = -(-page_count // chunk_pages) if chunk_pages else 0
    # renderer: what found the pages (pdfium when MuPDF gave up on the document), for the run's counters
    yield {**doc, "page_count": page_count, "chunk_count": chunk_count, "renderer": renderer}

    base = {k: doc[k] for k in ("source_uri", "doc_id")} | {"page_count": page_count}
    chunk: list[dict[str, Any]] = []
    for number in range(1, page_count + 1):
        row = {**base, "kind": PAGE, "page_number": number, "status": "ok"}
        try:
            _maybe_stall(source_uri, number)
            page = next(pages)
            rendered = page(opts, longest_edge)
            row.update(image=rendered.image, image_codec=rendered.codec, width=rendered.width, height=rendered.height,
                       renderer=page.renderer)
            if ocr and route is not None:
                row.update(_route(page, rendered, route))
        except RowError as exc:
            reraise_if_fail_fast()
            row.update(status="error", error_type=exc.error_type, error_message=exc.message)
        except Exception as exc:  # one bad page must not take its document down
            reraise_if_fail_fast()
            row.update(status="error", error_type="render_error", error_message=describe(exc))
        if chunk_pages and row["status"] == "ok":
            chunk.append(row)
        # Pages the model won't read travel without their image (chunks above keep theirs, for extraction).
        routed = row.get("text_source") is not None
        yield row if ocr and not routed else {k: v for k, v in row.items() if k not in ("image", "image_codec")}
        if chunk_pages and (number % chunk_pages == 0 or number == page_count):
            yield _chunk_record(base, (number - 1) // chunk_pages, chunk_count, chunk)
            chunk = []


def _route(page, rendered, route: RouteOptions) -> dict[str, Any]:
    """text and text_source for a page answered without the model, and route_reason for every page: why it was
    answered so, or why the model must read it (route.trust_text_layer's reasons, text_layer_never,
    text_layer_error)."""
    from pipeline.route import ConversionError, is_blank, trust_text_layer
    from pipeline.text_layer import clean_text

    reason = "text_layer_never"
    if route.text_layer == "auto":
        try:
            layer = page.text_layer()
        except (AttributeError, TypeError, NameError):
            raise  # our code's mistake, not the document's: the page's error row shows it (a silent model read hid one)
        except Exception:  # a layer the renderer cannot read is not trusted: the model reads the page
            reraise_if_fail_fast()
            layer, reason = None, "text_layer_error"
        verdict = trust_text_layer(layer, route)
        if verdict.trusted:
            try:
                return {"text": clean_text(layer.page_text()), "text_source": "text_layer",
                        "route_reason": verdict.reason}
            except ConversionError:  # the converter's libraries failed on this page's PDF: the model reads it
                reraise_if_fail_fast()
                reason = "text_layer_error"
        elif reason != "text_layer_error":
            reason = verdict.reason
    if route.skip_blank and is_blank(_pixels(rendered), route):
        return {"text": "", "text_source": "blank", "route_reason": "blank"}
    return {"route_reason": reason}


def _pixels(rendered):
    """A rendered page as an (H, W, 3) uint8 array."""
    from pipeline.render import RAW_CODEC, decode_raw

    if rendered.codec == RAW_CODEC:
        return decode_raw(rendered.image, rendered.width, rendered.height)
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(rendered.image)).convert("RGB"))


def _maybe_stall(source_uri: str, number: int) -> None:
    """Fault injection for tests: DOCPIPE_FAULT_RENDER="name@page=seconds,..." sleeps before rendering that
    page of documents whose URI contains name (page * for every page); seconds "crash" kills the process;
    "until:PATH" creates PATH.waiting, then waits until PATH exists (a test's event, not a guess at timing)."""
    import os
    import time

    for spec in filter(None, os.environ.get("DOCPIPE_FAULT_RENDER", "").split(",")):
        target, _, action = spec.partition("=")
        name, _, page = target.partition("@")
        if name in source_uri and page in ("*", str(number)):
            if action == "crash":
                import signal

                os.kill(os.getpid(), signal.SIGSEGV)  # as a crash inside MuPDF would
            if action.startswith("until:"):
                path = action.removeprefix("until:")
                open(path + ".waiting", "w").close()
                while not os.path.exists(path):
                    time.sleep(0.05)
                continue
            time.sleep(float(action))


def _chunk_record(base: dict[str, Any], index: int, count: int, pages: list[dict[str, Any]]) -> dict[str, Any]:
    rec = {**base, "kind": CHUNK, "chunk_index": index, "chunk_count": count, "status": "ok",
           "images": [p["image"] for p in pages], "image_codecs": [p["image_codec"] for p in pages],
           "widths": [p["width"] for p in pages], "heights": [p["height"] for p in pages]}
    if not pages:
        rec.update(status="error", error_type="render_error", error_message=f"no page of chunk {index + 1} rendered")
    return rec


def _open(data: bytes, media_type: str | None) -> Iterator:
    """Generator: first yields the page count and the renderer that found the pages, then one render
    callable per page."""
    if not data:
        raise RowError("empty_file", "file is empty (0 bytes)")
    if media_type == PDF:
        yield from _pdf_pages(data)
    elif media_type is not None:
        yield from _image_frames(data, media_type)
    else:
        raise RowError("unsupported_media_type", f"not a PDF or a supported image (starts with {data[:8]!r})")


def _pdf_pages(data: bytes) -> Iterator:
    """MuPDF's pages; PDFium's (pipeline.pdfium) for a document MuPDF cannot open, finds no pages in or asks a
    password for, and for each page MuPDF fails on."""
    pdf, page_count, problem = _open_mupdf(data)
    if problem is not None:
        yield from _pdfium_pages(data, *problem)
        return
    yield page_count, _PdfPage.renderer
    fallback = _PdfiumFallback(data)
    from pipeline.text_layer import RunningLines

    running = RunningLines(pdf)  # running heads and page numbers, found across neighbouring pages
    for index in range(page_count):
        yield _WithFallback(_PdfPage(pdf, index, running), lambda index=index: fallback.page(index))



def _open_mupdf(data: bytes):
    """(document, page count, None), or (None, 0, (what, why)) with what one of corrupt, encrypted, empty."""
    import pymupdf

    pymupdf.TOOLS.mupdf_display_errors(False)  # MuPDF's repair chatter would flood worker logs
    try:
        pdf = pymupdf.open(stream=data, filetype="pdf")
        if pdf.needs_pass:
            return None, 0, ("encrypted", "needs a password")
        page_count = pdf.page_count  # raises on some damaged page trees ("Invalid number of pages")
    except Exception as exc:
        return None, 0, ("corrupt", describe(exc))
    if page_count == 0:
        return None, 0, ("empty", "no pages")
    return pdf, page_count, None


def _pdfium_pages(data: bytes, mupdf_what: str, mupdf_why: str) -> Iterator:
    """PDFium's pages of a document MuPDF gave up on; if PDFium gives none either, the error both agree on."""
    from pipeline.pdfium import PdfiumOpenError, PdfiumPage, open_pdfium

    try:
        pdf = open_pdfium(data)
    except PdfiumOpenError as exc:
        what, why = exc.what, str(exc)
    except Exception as exc:
        what, why = "corrupt", describe(exc)
    else:
        yield len(pdf), PdfiumPage.renderer
        for index in range(len(pdf)):
            yield PdfiumPage(pdf, index)
        return
    reasons = f"MuPDF: {mupdf_why}; PDFium: {why}"
    if mupdf_what == what == "empty":
        raise RowError("empty_document", f"PDF has no pages ({reasons})")
    if "encrypted" in (mupdf_what, what):
        raise RowError("encrypted_document", f"PDF is encrypted and needs a password ({reasons})")
    raise RowError("corrupt_document", f"cannot open PDF: {reasons}")


class _PdfiumFallback:
    """The PDFium copy of a document MuPDF opened, made the first time MuPDF fails on one of its pages."""

    def __init__(self, data: bytes):
        self.data, self.pdf, self.error = data, None, None  # error: why PDFium could not open it

    def page(self, index: int):
        from pipeline.pdfium import PdfiumOpenError, PdfiumPage, open_pdfium

        if self.pdf is None and self.error is None:
            try:
                self.pdf = open_pdfium(self.data)
            except Exception as exc:
                why = str(exc) if isinstance(exc, PdfiumOpenError) else describe(exc)
                self.error = f"cannot open the document: {why}"
        if self.error is not None:
            raise RowError("render_error", self.error)
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
            error_type, first = "render_error", describe(exc)
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


class _PdfPage:
    """A page callable: called, it renders; every page class also has ``text_layer()`` for routing."""

    renderer = "pymupdf"

    def __init__(self, pdf, index: int, running=None):
        self.pdf, self.index, self.running = pdf, index, running  # running: the document's text_layer.RunningLines

    def text_layer(self):
        """This renderer's view of the page's text layer (route.TextLayer), or None if it offers none."""
        from pipeline.route import pymupdf_text_layer

        return pymupdf_text_layer(self.pdf.load_page(self.index), self.running)

    def __call__(self, opts: RenderOptions, longest_edge: int):
        page = self.pdf.load_page(self.index)
        try:
            return render_pdf_page(page, opts, longest_edge)
        finally:
            del page  # release the page's display list before the next one


def _image_frames(data: bytes, media_type: str) -> Iterator:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        frames = getattr(img, "n_frames", 1)  # multi-page TIFF, animated GIF/WebP: each frame is a page
    except Image.DecompressionBombError as exc:  # Pillow checks the header's size before decoding anything
        raise RowError("image_too_large", describe(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RowError("corrupt_document", f"cannot open {media_type}: {describe(exc)}") from None
    yield frames, _ImageFrame.renderer
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
            raise RowError("image_too_large", f"image is {w}x{h} pixels, over 4 x max_pixels ({opts.max_pixels})")
        try:
            self.img.seek(self.index)
            frame = ImageOps.exif_transpose(self.img)  # scanners and phones store rotation in EXIF
            return render_image(frame, opts, longest_edge)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise RowError("image_decode_error", describe(exc)) from None


def expand_document_isolated(source_uri: str, opts: RenderOptions, *args, **kwargs) -> Iterator[dict[str, Any]]:
    """``expand_document`` in a render process, under ``opts``' document and page time limits.

    MuPDF's C code can't be interrupted from Python, so a hanging or crashing document is contained in a
    process that can be killed. The process is kept from one document to the next (warm fonts and caches;
    a fresh one per document cost two thirds of the stage's speed) and replaced after a kill. Records stream
    back one at a time; if the process is killed or dies, the document is finished here with error rows for
    what it did not deliver, so its accounting stays whole.
    """
    import time

    if opts.document_timeout_s is None and opts.page_timeout_s is None:
        yield from expand_document(source_uri, opts, *args, **kwargs)
        return
    # The resume set can hold millions of ids: it stays here, and is checked on the first record.
    skip_ids = kwargs.pop("skip_ids", frozenset())
    doc, delivered = None, {PAGE: set(), CHUNK: set()}
    worker, failure = _render_worker()
    complete = False
    try:
        if failure is None:
            try:
                worker.conn.send((source_uri, opts, args, kwargs))
            except OSError as exc:  # it died since the last document
                failure = ("renderer_crashed", f"the rendering process died: {describe(exc)}")
        # Only time spent waiting for the render process counts: while this generator is paused (Ray Data's
        # backpressure), a finished page waits in the pipe and the clocks must not run.
        waited = 0.0
        doc_limit, page_limit = opts.document_timeout_s or float("inf"), opts.page_timeout_s or float("inf")
        while failure is None:
            t = time.monotonic()
            ready = worker.conn.poll(min(page_limit, doc_limit - waited))
            waited += time.monotonic() - t
            if not ready:
                which, limit = ("document", doc_limit) if waited >= doc_limit else ("page", page_limit)
                failure = ("timeout", f"rendering exceeded the {which} time limit ({limit:g} s)")
                break
            try:
                rec = worker.conn.recv()
            except EOFError:  # the process died without a word
                worker.process.join(5)
                failure = ("renderer_crashed", f"the rendering process died (exit code {worker.process.exitcode})")
                break
            if rec is None:
                complete = True
                return
            if isinstance(rec, tuple):  # the render process failed this document and goes on (_render_server)
                failure, complete = rec, True
                break
            if rec["kind"] == DOCUMENT:
                if rec.get("doc_id") in skip_ids:
                    yield {k: v for k, v in rec.items() if k not in ("page_count", "chunk_count")} | {
                        "status": "skipped", "error_message": SAME_BYTES}
                    return
                doc = rec
            else:
                delivered[rec["kind"]].add(rec["page_number"] if rec["kind"] == PAGE else rec["chunk_index"])
            yield rec
    finally:
        if not complete:  # mid-document (over time, dead, skipped or abandoned): its output must not leak
            _stop_render_worker()
    yield from _finish_undelivered(source_uri, doc, delivered, failure)


@dataclass
class _RenderWorker:
    process: Any
    conn: Any


_worker: _RenderWorker | None = None


def _render_worker() -> tuple[_RenderWorker | None, tuple[str, str] | None]:
    """This process's render process, started if need be; or why it could not start."""
    global _worker
    import multiprocessing as mp

    if _worker is not None and _worker.process.is_alive():
        return _worker, None
    _stop_render_worker()
    ctx = mp.get_context("forkserver")  # forks from a clean server process, not from a threaded Ray worker
    # Each render process is forked with its readers already imported: a replacement for a killed one must not
    # spend a document's page time limit importing MuPDF (about a second, several on a loaded machine).
    ctx.set_forkserver_preload(["pipeline.documents", "pymupdf", "pypdfium2", "PIL.Image"])
    conn, child_conn = ctx.Pipe(duplex=True)
    process = ctx.Process(target=_render_server, args=(child_conn,), daemon=True)
    process.start()
    child_conn.close()
    worker = _RenderWorker(process, conn)
    try:
        if conn.poll(STARTUP_S) and conn.recv() == "started":
            _worker = worker
            return worker, None
    except EOFError:
        pass
    process.kill()
    process.join(5)
    return None, ("renderer_crashed", f"the rendering process did not start (exit code {process.exitcode})")


def _stop_render_worker() -> None:
    global _worker
    if _worker is not None:
        if _worker.process.is_alive():
            _worker.process.kill()
        _worker.process.join(5)
        _worker.conn.close()
        _worker = None


def _render_server(conn) -> None:
    """The render process: documents in, their records out, one document at a time, until the pipe closes.

    It outlives every document: an exception that escapes ``expand_document`` (a bug, or a reader raising
    where no one expected it) ends that document with an ``(error_type, message)`` tuple in place of the
    closing None; the parent turns it into rows for what was not delivered, and the process takes the next
    document. No traceback is printed.
    """
    conn.send("started")
    while True:
        try:
            source_uri, opts, args, kwargs = conn.recv()
        except EOFError:
            return
        try:
            for rec in expand_document(source_uri, opts, *args, **kwargs):
                _send(conn, rec)
            end = None
        except _ParentGone:
            return
        except Exception as exc:
            end = ("render_error", f"rendering failed: {describe(exc)}")
        try:
            _send(conn, end)
        except _ParentGone:
            return


class _ParentGone(Exception):
    """The pipe to the parent is closed: the render process has no one left to serve."""


def _send(conn, rec) -> None:
    try:
        conn.send(rec)
    except OSError:  # BrokenPipeError and kin
        raise _ParentGone() from None


def _finish_undelivered(source_uri, doc, delivered, failure) -> Iterator[dict[str, Any]]:
    """Error rows for what a killed or dead render process did not deliver: the document if it never came,
    else its missing pages and chunks."""
    error_type, message = failure
    if doc is None:  # killed while reading or opening
        yield {"kind": DOCUMENT, "source_uri": source_uri, "status": "error", "error_type": error_type,
               "error_message": message}
        return
    base = {"source_uri": source_uri, "doc_id": doc["doc_id"], "page_count": doc["page_count"]}
    error = {"status": "error", "error_type": error_type, "error_message": message}
    for number in range(1, (doc["page_count"] or 0) + 1):
        if number not in delivered[PAGE]:
            yield {**base, "kind": PAGE, "page_number": number, **error}
    for index in range(doc.get("chunk_count") or 0):
        if index not in delivered[CHUNK]:
            yield {**base, "kind": CHUNK, "chunk_index": index, "chunk_count": doc["chunk_count"], **error}
