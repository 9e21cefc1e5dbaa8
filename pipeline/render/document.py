"""Open a document's bytes and expand it, lazily, into page records.

``expand_document`` is the read-and-render stage: it yields one ``document`` record
(what was found on opening) and then one ``page`` record per page, one page at a time,
so a 2,000-page PDF is never held whole. It never raises for a bad document: failures
become records with an error_type.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Any, Iterator

from docpipe.config import RenderOptions, RouteOptions, StorageOptions, selected_pages
from docpipe.errors import RowError, describe, error_fields
from docpipe.records import CHUNK, DOCUMENT, PAGE
from docpipe.storage import read_bytes
from docpipe.render.open import IMAGE_TYPES, PDF, open_pages
from docpipe.schemas import ErrorType


SAME_BYTES = "the same bytes are already ok in this output"


# A PDF's first object ("1 0 obj"), where a file lost its %PDF- header: MuPDF opens such files (it rebuilds the
# cross-reference table), so they are PDFs to read, not unsupported files.
_PDF_OBJECT = re.compile(rb"^\s*(%[^\n]*\n\s*)*\d+\s+\d+\s+obj\b")


def sniff_media_type(data: bytes) -> str | None:
    """Media type from the leading bytes; the file name is not trusted."""
    if b"%PDF-" in data[:1024]:  # readers accept junk before the header
        return PDF
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, media_type in IMAGE_TYPES.items():
        if data.startswith(magic):
            return media_type
    if _PDF_OBJECT.match(data[:1024]):
        return PDF
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
    pages: tuple[tuple[int, int | None], ...] | None = None,
    passwords=None,
    data: bytes | None = None,
    first_page: int = 1,
) -> Iterator[dict[str, Any]]:
    """Yield the document record, its page records (with images when ``ocr``) and, when ``chunk_pages`` is
    set, one chunk record per ``chunk_pages`` pages carrying their images for extraction. With ``route``
    (and ``ocr``), a page answered by its text layer or found blank carries its text and no image.
    ``fail_fast``: re-raise the first failure instead of recording it (--fail-fast, for its traceback).
    ``pages``: only these pages (config.parse_pages spans; the others are neither rendered nor yielded);
    ``passwords``: a render.passwords.Passwords for encrypted PDFs; ``data``: the document's bytes, when the
    caller has them (the Python API, a Ray Dataset of binary files), instead of reading ``source_uri``.
    ``first_page``: start there (the render process resumes a document after a page it was stopped on): earlier
    pages and the chunk they share with it are not yielded again."""
    doc: dict[str, Any] = {"kind": DOCUMENT, "source_uri": source_uri, "status": "ok"}
    try:
        data = read_bytes(source_uri, storage) if data is None else data
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
        found = open_pages(data, doc["media_type"], passwords.candidates(source_uri) if passwords else ())
        page_count, renderer, repaired = next(found)
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
    numbers = selected_pages(pages, page_count)  # page_count stays the document's own, in every row
    if not numbers:
        yield {**doc, "page_count": page_count, **error_fields(
            ErrorType.empty_document, f"none of its {page_count} pages is in --pages {format_pages(pages)}")}
        return
    chunk_count = -(-len(numbers) // chunk_pages) if chunk_pages else 0
    # renderer: what found the pages (pdfium when MuPDF gave up on the document), for the run's counters
    yield {**doc, "page_count": page_count, "chunk_count": chunk_count, "renderer": renderer, "repaired": repaired}

    base = {k: doc[k] for k in ("source_uri", "doc_id")} | {"page_count": page_count}
    chunk: list[dict[str, Any]] = []
    wanted, done = set(numbers), 0  # done: wanted pages so far, skipped ones too (chunk numbers after a resume)
    for number in range(1, numbers[-1] + 1):
        if number not in wanted or number < first_page:
            next(found)  # pages come in order and open lazily: this one is passed over, neither rendered nor yielded
            done += number in wanted
            continue
        done += 1
        row = {**base, "kind": PAGE, "page_number": number, "status": "ok"}
        try:
            _maybe_stall(source_uri, number)
            page = next(found)
            rendered = page(opts, longest_edge)
            row.update(image=rendered.image, image_codec=rendered.codec, width=rendered.width, height=rendered.height,
                       renderer=page.renderer, damage=getattr(page, "damage", None))
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
        if chunk_pages and (done % chunk_pages == 0 or number == numbers[-1]):
            index = (done - 1) // chunk_pages
            if numbers[index * chunk_pages] >= first_page:  # else its first pages were another process's: lost
                yield _chunk_record(base, index, chunk_count, chunk)
            chunk = []


def format_pages(spans) -> str:
    """config.parse_pages spans written back as the flag takes them: 1-5,8 or 3-."""
    return ",".join(str(a) if a == b else f"{a}-{b or ''}" for a, b in spans)


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
