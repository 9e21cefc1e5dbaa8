"""Open a document's bytes and expand it, lazily, into page records.

``expand_document`` is the read-and-render stage: it yields one ``document`` record
(what was found on opening) and then one ``page`` record per page, one page at a time,
so a 2,000-page PDF is never held whole. It never raises for a bad document: failures
become records with an error_type.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Iterator

from docpipe.config import RenderOptions, RouteOptions, StorageOptions
from docpipe.errors import RowError, describe, error_fields
from docpipe.records import CHUNK, DOCUMENT, PAGE
from docpipe.storage import read_bytes
from docpipe.render.open import IMAGE_TYPES, PDF, open_pages
from docpipe.schemas import ErrorType


SAME_BYTES = "the same bytes are already ok in this output"


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
    fail_fast: bool = False,
    first_page: int = 1,
) -> Iterator[dict[str, Any]]:
    """Yield the document record, its page records (with images when ``ocr``) and, when ``chunk_pages`` is
    set, one chunk record per ``chunk_pages`` pages carrying their images for extraction. With ``route``
    (and ``ocr``), a page answered by its text layer or found blank carries its text and no image.
    ``fail_fast``: re-raise the first failure instead of recording it (--fail-fast, for its traceback).
    ``first_page``: start there (the render process resumes a document after a page it was stopped on): earlier
    pages and the chunk they share with it are not yielded again."""
    doc: dict[str, Any] = {"kind": DOCUMENT, "source_uri": source_uri, "status": "ok"}
    try:
        data = read_bytes(source_uri, storage)
    except OSError as exc:  # after the filesystem's own retries: missing, denied, or still failing
        if fail_fast:
            raise
        yield {**doc, **error_fields(ErrorType.read_error, describe(exc))}
        return
    doc.update(doc_id=hashlib.sha256(data).hexdigest(), size_bytes=len(data), media_type=sniff_media_type(data))
    if doc["doc_id"] in skip_ids:  # resume: the same bytes are already ok in this output, under some URI
        yield {**doc, "status": "skipped", "error_message": SAME_BYTES}
        return
    try:
        pages = open_pages(data, doc["media_type"])
        page_count, renderer = next(pages)
    except RowError as exc:
        if fail_fast:
            raise
        yield {**doc, **exc.fields()}
        return
    except Exception as exc:  # a reader's own failure while opening, not one it reported: the file is at fault
        if fail_fast:
            raise
        yield {**doc, **error_fields(ErrorType.corrupt_document, f"cannot open: {describe(exc)}")}
        return
    del data  # the opened document keeps what it needs
    chunk_count = -(-page_count // chunk_pages) if chunk_pages else 0
    # renderer: what found the pages (pdfium when MuPDF gave up on the document), for the run's counters
    yield {**doc, "page_count": page_count, "chunk_count": chunk_count, "renderer": renderer}

    base = {k: doc[k] for k in ("source_uri", "doc_id")} | {"page_count": page_count}
    chunk: list[dict[str, Any]] = []
    for number in range(1, page_count + 1):
        if number < first_page:
            next(pages)  # pages are opened lazily: an earlier page costs nothing here
            continue
        row = {**base, "kind": PAGE, "page_number": number, "status": "ok"}
        try:
            _maybe_stall(source_uri, number)
            page = next(pages)
            rendered = page(opts, longest_edge)
            row.update(image=rendered.image, image_codec=rendered.codec, width=rendered.width, height=rendered.height,
                       renderer=page.renderer)
            if ocr and route is not None:
                row.update(_route(page, rendered, route, fail_fast))
        except RowError as exc:
            if fail_fast:
                raise
            row.update(exc.fields())
        except Exception as exc:  # one bad page must not take its document down
            if fail_fast:
                raise
            row.update(error_fields(ErrorType.render_error, describe(exc)))
        if chunk_pages and row["status"] == "ok":
            chunk.append(row)
        # Pages the model won't read travel without their image (chunks above keep theirs, for extraction).
        routed = row.get("text_source") is not None
        yield row if ocr and not routed else {k: v for k, v in row.items() if k not in ("image", "image_codec")}
        if chunk_pages and (number % chunk_pages == 0 or number == page_count):
            index = (number - 1) // chunk_pages
            if index * chunk_pages + 1 >= first_page:  # else its first pages were another process's: it is lost
                yield _chunk_record(base, index, chunk_count, chunk)
            chunk = []


def _route(page, rendered, route: RouteOptions, fail_fast: bool = False) -> dict[str, Any]:
    """text and text_source for a page answered without the model (a text-layer page also its blocks and
    text_layer_analysis), and route_reason for every page: why it was answered so, or why the model must read it
    (route.trust_text_layer's reasons, text_layer_never, text_layer_error)."""
    from docpipe.render.route import ConversionError, is_blank, trust_text_layer
    from docpipe.render.text_layer import clean_text

    reason = "text_layer_never"
    if route.text_layer == "auto":
        try:
            layer = page.text_layer()
        except (AttributeError, TypeError, NameError):
            raise  # our code's mistake, not the document's: the page's error row shows it (a silent model read hid one)
        except Exception:  # a layer the renderer cannot read is not trusted: the model reads the page
            if fail_fast:
                raise
            layer, reason = None, "text_layer_error"
        verdict = trust_text_layer(layer, route)
        if verdict.trusted:
            try:
                markdown = layer.page_text()
                # PyMuPDF's Markdown carries its blocks and how it was found (text_layer.PageMarkdown); PDFium's
                # plain text has neither
                return {"text": clean_text(markdown), "text_source": "text_layer", "route_reason": verdict.reason,
                        "blocks": getattr(markdown, "blocks", None),
                        "text_layer_analysis": getattr(markdown, "analysis", None)}
            except ConversionError:  # the converter's libraries failed on this page's PDF: the model reads it
                if fail_fast:
                    raise
                reason = "text_layer_error"
        elif reason != "text_layer_error":
            reason = verdict.reason
    if route.skip_blank and is_blank(_pixels(rendered), route):
        return {"text": "", "text_source": "blank", "route_reason": "blank", "blocks": []}
    return {"route_reason": reason}


def _pixels(rendered):
    """A rendered page as an (H, W, 3) uint8 array."""
    from docpipe.render.pixels import RAW_CODEC, decode_raw

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
        rec.update(error_fields(ErrorType.render_error, f"no page of chunk {index + 1} rendered"))
    return rec
