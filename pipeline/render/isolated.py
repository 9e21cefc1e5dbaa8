"""The render process: ``expand_document`` run in a child process under the document and page time limits.

MuPDF's C code can't be interrupted from Python, so a document that hangs or crashes the renderer is contained in a
process that can be killed; the document is then finished here with error rows for what was not delivered.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from docpipe.config import RenderOptions, selected_pages
from docpipe.errors import describe, error_fields
from docpipe.records import CHUNK, DOCUMENT, PAGE
from docpipe.render.document import SAME_BYTES, expand_document
from docpipe.schemas import ErrorType


STARTUP_S = 120  # for a render process to start


def expand_document_isolated(source_uri: str, opts: RenderOptions, *args, **kwargs) -> Iterator[dict[str, Any]]:
    """``expand_document`` in a render process, under ``opts``' document and page time limits.

    MuPDF's C code can't be interrupted from Python, so a hanging or crashing document is contained in a
    process that can be killed. The process is kept from one document to the next (warm fonts and caches;
    a fresh one per document cost two thirds of the stage's speed) and replaced after a kill. Records stream
    back one at a time. A page over the page limit, or one the process dies on, becomes that page's error row, and a
    fresh process goes on from the page after it; if the document runs over its own limit, it is finished here with
    error rows for what it did not deliver, so its accounting stays whole.
    """
    import time

    if opts.document_timeout_s is None and opts.page_timeout_s is None:
        yield from expand_document(source_uri, opts, *args, **kwargs)
        return
    # The resume set can hold millions of ids: it stays here, and is checked on the first record.
    skip_ids = kwargs.pop("skip_ids", frozenset())
    doc, delivered = None, {PAGE: set(), CHUNK: set()}
    worker, failure = _render_worker()
    complete, first_page, lost = False, 1, None
    try:
        # Only time spent waiting for the render process counts: while this generator is paused (Ray Data's
        # backpressure), a finished page waits in the pipe and the clocks must not run.
        waited = 0.0
        doc_limit, page_limit = opts.document_timeout_s or float("inf"), opts.page_timeout_s or float("inf")
        while True:  # one render process per pass: a page cut off, or one it died on, ends a pass
            if failure is None:
                try:
                    worker.conn.send((source_uri, opts, args, kwargs | {"first_page": first_page}))
                except OSError as exc:  # it died since the last document
                    failure = (ErrorType.renderer_crashed, f"the rendering process died: {describe(exc)}")
            page_failed = False
            while failure is None:
                t = time.monotonic()
                ready = worker.conn.poll(min(page_limit, doc_limit - waited))
                waited += time.monotonic() - t
                if not ready:
                    which, limit = ("document", doc_limit) if waited >= doc_limit else ("page", page_limit)
                    failure = (ErrorType.timeout, f"rendering exceeded the {which} time limit ({limit:g} s)")
                    page_failed = which == "page"
                    break
                try:
                    rec = worker.conn.recv()
                except EOFError:  # the process died without a word
                    worker.process.join(5)
                    failure = (ErrorType.renderer_crashed,
                               f"the rendering process died (exit code {worker.process.exitcode})")
                    page_failed = True
                    break
                if rec is None:
                    complete = True
                    break
                if isinstance(rec, tuple):  # the render process failed this document and goes on (_render_server)
                    failure, complete = rec, True
                    break
                if rec["kind"] == DOCUMENT:
                    if doc is not None:  # a later pass: the document was told already
                        continue
                    if rec.get("doc_id") in skip_ids:
                        yield {k: v for k, v in rec.items() if k not in ("page_count", "chunk_count")} | {
                            "status": "skipped", "error_message": SAME_BYTES}
                        return
                    doc = rec
                else:
                    delivered[rec["kind"]].add(rec["page_number"] if rec["kind"] == PAGE else rec["chunk_index"])
                yield rec
            # A page that ran over its limit (or killed its process) is that page's failure, not the document's:
            # the pages after it are rendered by a fresh process, from the page after it (their own clocks).
            stuck = _next_page(doc, delivered, kwargs.get("pages")) if page_failed else None
            if stuck is None:
                break
            yield {"kind": PAGE, "source_uri": source_uri, "doc_id": doc["doc_id"], "page_count": doc["page_count"],
                   "page_number": stuck, **error_fields(*failure)}
            delivered[PAGE].add(stuck)
            _stop_render_worker()
            if _next_page(doc, delivered, kwargs.get("pages")) is None:  # it was the last page wanted
                break
            lost, first_page = failure, stuck + 1  # lost: what the chunk holding that page fails with
            worker, failure = _render_worker()
    finally:
        if not complete:  # mid-document (over time, dead, skipped or abandoned): its output must not leak
            _stop_render_worker()
    if failure is None and first_page > 1:
        failure = lost  # the document finished, but without the pages cut off: their chunks are lost with them
    if failure is not None:
        yield from _finish_undelivered(source_uri, doc, delivered, failure, kwargs.get("pages"))


def _next_page(doc, delivered, pages=None) -> int | None:
    """The page a render process was on when it was stopped: the first page of the selection ``pages``
    (config.parse_pages spans) after the last one it delivered (pages come in order), or None."""
    if doc is None or not doc.get("page_count"):
        return None
    last = max(delivered[PAGE], default=0)
    return next((n for n in selected_pages(pages, doc["page_count"]) if n > last), None)


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
    ctx.set_forkserver_preload(["docpipe.render.document", "pymupdf", "pypdfium2", "PIL.Image"])
    conn, child_conn = ctx.Pipe(duplex=True)
    process = ctx.Process(target=_render_server, args=(child_conn,), daemon=True)
    with _caller_script_hidden():
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
    return None, (ErrorType.renderer_crashed, f"the rendering process did not start (exit code {process.exitcode})")


@contextlib.contextmanager
def _caller_script_hidden():
    """multiprocessing runs the caller's main script again in a new process (as __mp_main__) to rebuild its
    globals; the render server needs none of them, and a user's script calling docpipe.convert at top level,
    without an ``if __name__ == "__main__"`` guard, would start converting again in it. So the process is started
    with the script's name hidden from multiprocessing."""
    import sys

    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__} if main else {}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


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
            end = (ErrorType.render_error, f"rendering failed: {describe(exc)}")
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


def _finish_undelivered(source_uri, doc, delivered, failure, pages=None) -> Iterator[dict[str, Any]]:
    """Error rows for what a killed or dead render process did not deliver: the document if it never came,
    else its missing pages (of the selection ``pages``, config.parse_pages spans) and chunks."""
    error_type, message = failure
    if doc is None:  # killed while reading or opening
        yield {"kind": DOCUMENT, "source_uri": source_uri, **error_fields(error_type, message)}
        return
    base = {"source_uri": source_uri, "doc_id": doc["doc_id"], "page_count": doc["page_count"]}
    error = error_fields(error_type, message)
    for number in selected_pages(pages, doc["page_count"] or 0):
        if number not in delivered[PAGE]:
            yield {**base, "kind": PAGE, "page_number": number, **error}
    for index in range(doc.get("chunk_count") or 0):
        if index not in delivered[CHUNK]:
            yield {**base, "kind": CHUNK, "chunk_index": index, "chunk_count": doc["chunk_count"], **error}
