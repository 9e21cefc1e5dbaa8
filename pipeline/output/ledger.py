"""The per-document ledger: every input document's status, accounted for as its pages and chunks come back."""

from __future__ import annotations

from typing import Any


from docpipe.config import selected_pages
from docpipe.errors import ERROR_KEYS, error_fields
from docpipe.records import CHUNK, DOCUMENT
from docpipe.sources import DocumentRef
from docpipe.schemas import EXTRACTION_COLUMNS, ErrorType


class DocumentLedger:
    """Turns the stream of document and page records into exactly one documents row per input."""

    def __init__(self, refs: list[DocumentRef], run_id: str, schema=None, pages=None):
        self.run_id, self.schema = run_id, schema  # schema: extract.SchemaSpec when extracting
        self.pages = pages  # the run's page selection (config.parse_pages spans), None: every page
        self.expected = {r.source_uri: r for r in refs}
        self.open: dict[str, dict[str, Any]] = {}
        self.done: set[str] = set()

    def _state(self, uri: str) -> dict[str, Any]:
        return self.open.setdefault(uri, _new_state())

    def add(self, rec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """Record one stream record; once all of a document has been seen, return its documents row and
        its page records (held until then, so the two are written together)."""
        st = self._state(rec["source_uri"])
        if rec["kind"] == DOCUMENT:
            st["doc"] = rec
        elif rec["kind"] == CHUNK:
            st["chunks"].append(rec)
        else:
            st["pages"] += 1
            if rec["status"] == "ok" and rec.get("damage"):  # read, but MuPDF could not load all of its content
                rec.update(error_fields(ErrorType.content_lost, "part of the page's content could not be loaded "
                                        f"(MuPDF: {rec['damage']})", status="partial"))
            st["page_rows"].append(rec)
            if rec["status"] != "ok":
                st["failed" if rec["status"] == "error" else "damaged"] += 1
                st["first_error"] = st["first_error"] or (rec["error_type"], rec["error_message"], rec["page_number"])
        doc = st["doc"]
        if doc is not None and (
            doc["status"] != "ok"
            or (st["pages"] >= self._expected(doc["page_count"]) and len(st["chunks"]) >= (doc.get("chunk_count") or 0))
        ):
            return self._finish(rec["source_uri"])
        return None

    def _expected(self, page_count: int | None) -> int:
        """Page records a document of ``page_count`` pages sends: those of the run's selection."""
        return len(selected_pages(self.pages, page_count or 0)) if self.pages else (page_count or 0)

    def _finish(self, uri: str, lost: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        st = self.open.pop(uri, None) or _new_state()
        self.done.add(uri)
        return self._document_row(uri, st, lost), st["page_rows"]

    def skip(self, ref: DocumentRef) -> None:
        """An input skipped at listing time, unchanged since an earlier run's row: accounted for, with no row."""
        self.done.add(ref.source_uri)

    def _document_row(self, uri: str, st: dict[str, Any], lost: str | None) -> dict[str, Any]:
        doc = st["doc"] or {}
        ref = self.expected.get(uri)
        row = {
            "doc_id": doc.get("doc_id"),
            "source_uri": uri,
            "size_bytes": doc.get("size_bytes", ref.size_bytes if ref else None),
            "source_mtime": ref.mtime if ref else None,
            "media_type": doc.get("media_type"),
            "page_count": doc.get("page_count"),
            "repaired": doc.get("repaired"),
            "status": doc.get("status", "error"),
            # the document record's own failure (or none), carried over as recorded
            **{key: doc.get(key) for key in ERROR_KEYS},
            "run_id": self.run_id,
        }
        if lost:
            row.update(error_fields(ErrorType.lost, lost))
        elif row["status"] == "ok" and (st["failed"] or st["damaged"]):
            etype, emsg, number = st["first_error"]
            total = self._expected(row["page_count"])
            failed = " and ".join(f"{n} of {total} pages {what}" for n, what in
                                  ((st["failed"], "failed"), (st["damaged"], "lost content")) if n)
            message = f"{failed}; first, page {number}: {etype}: {emsg}"
            if st["failed"] >= total:
                row.update(error_fields(ErrorType.all_pages_failed, message))
            else:
                row.update(error_fields(ErrorType(etype), message, status="partial"))
        if self.schema is not None and st["chunks"]:
            self._add_extraction(row, sorted(st["chunks"], key=lambda c: c["chunk_index"]))
        return row

    def _add_extraction(self, row: dict[str, Any], chunks: list[dict[str, Any]]) -> None:
        """One document's extraction from its chunks: merged in page order, then validated once more."""
        import json

        from docpipe.extract.merge import merge_chunks

        row.update(schema_name=self.schema.name, schema_hash=self.schema.hash)
        failed = [c for c in chunks if c["status"] != "ok"]
        if failed:
            row.update(valid=False, validation_errors=[f"chunk {c['chunk_index'] + 1}: {c['error_type']}: "
                                                       f"{c['error_message']}" for c in failed])
            if row["status"] == "ok":
                message = f"extraction failed on {len(failed)} of {len(chunks)} chunks"
                row.update(error_fields(ErrorType.extraction_failed, message, status="partial"))
        if len(chunks) == 1 and not failed:
            c = chunks[0]
            row.update({k: c[k] for k in EXTRACTION_COLUMNS})
            return
        ok = [c for c in chunks if c["status"] == "ok"]
        merged = merge_chunks([json.loads(c["extraction"]) if c["extraction"] else None for c in ok])
        errors = self.schema.validate(merged) + [e for c in ok for e in (c["validation_errors"] or [])
                                                 if e.startswith("<output>")]
        row.update(
            extraction=json.dumps(merged, ensure_ascii=False, separators=(",", ":")),
            valid=not errors and not failed,
            validation_errors=(row.get("validation_errors") or []) + errors,
            raw_output=json.dumps([c["raw_output"] for c in ok], ensure_ascii=False),
            extraction_finish_reason=next((c["extraction_finish_reason"] for c in ok
                                           if c["extraction_finish_reason"] != "stop"), "stop" if ok else None),
            extraction_attempts=sum(c["extraction_attempts"] or 0 for c in ok),
        )

    def finish_all(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Rows for every input not yet accounted for: nothing is dropped without a trace."""
        rows = []
        for uri in list(self.open):
            st = self.open[uri]
            expected = st["doc"]["page_count"] if st["doc"] else None
            rows.append(self._finish(uri, lost=f"only {st['pages']} of {expected} pages came back from the pipeline"))
        for uri in self.expected:
            if uri not in self.done:
                rows.append(self._finish(uri, lost="the document never came back from the pipeline"))
        return rows


def _new_state() -> dict[str, Any]:
    return {"doc": None, "pages": 0, "failed": 0, "damaged": 0, "first_error": None, "chunks": [], "page_rows": []}
