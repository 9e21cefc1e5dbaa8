"""Where results land: Parquet tables under OUT, the per-document ledger, and the run manifest.

Files are written under a name readers ignore (leading underscore) and renamed when
complete, so a dataset reader never sees half a file. ``_runs/<run_id>.json`` is written
last: its presence marks a finished run.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import StorageOptions
from pipeline.errors import OutputError, describe
from pipeline.records import CHUNK, DOCUMENT, PAGE
from pipeline.sources import DocumentRef
from pipeline.storage import explain, is_remote, join, resolve
from schemas import CONTRACT_VERSION, DOCUMENTS_SCHEMA, EXTRACTION_COLUMNS, PAGES_SCHEMA, RunManifest, TextSource


class Output:
    """OUT as a filesystem and a base path, local or in object storage."""

    def __init__(self, uri: str, storage: StorageOptions | None = None):
        from pyarrow.fs import LocalFileSystem

        self.uri = uri.rstrip("/") if is_remote(uri) else os.path.abspath(uri)
        self.fs, self.base = resolve(uri, storage)
        # Local files are written under a name readers skip, then renamed. An object store shows an object
        # only once its upload completes, so there the final name is written directly (no copy).
        self.rename = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return join(self.base, *parts)

    def write_bytes(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        target = self.path(os.path.dirname(rel), "_tmp-" + os.path.basename(rel)) if self.rename else final
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        if self.rename:
            self.fs.move(target, final)


def prepare_output(output: str, storage: StorageOptions | None = None) -> Output:
    """Check OUT can be written (a fatal error otherwise), before any document is read."""
    from pyarrow.fs import FileType

    try:
        out = Output(output, storage)
        if out.fs.get_file_info(out.base).type == FileType.File:
            raise OutputError(f"output is a file, not a folder: {output}")
        for sub in ("pages", "documents", "_runs"):
            out.fs.create_dir(out.path(sub), recursive=True)
        probe = out.path("_runs", f".probe-{os.getpid()}")
        with out.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        out.fs.delete_file(probe)
    except OutputError:
        raise
    except Exception as exc:  # OSError, or the SDK's errors for a missing bucket or bad credentials
        raise OutputError(explain(f"cannot write to output {output}: {describe(exc)}")) from None
    return out


def remove_stale_tmp(out: Output, keep_run: str) -> int:
    """Delete the ``_tmp-`` files that killed runs left (readers skip them, but they take space and confuse
    globbing engines). Called only by the holder of the output's lease (pipeline/lease.py), so no other run is
    writing: every file not named after ``keep_run`` (this run) is a dead run's."""
    if not out.rename:  # object stores: the final name is written directly, and an unfinished upload is invisible
        return 0
    mine = f"_tmp-part-{keep_run}-"
    try:
        stale = [path for table in ("pages", "documents") for path in table_files(out, table, "_tmp-")
                 if not os.path.basename(path).startswith(mine)]
        for path in stale:
            out.fs.delete_file(path)
    except OSError as exc:
        raise OutputError(f"cannot remove a killed run's unfinished files in {out.uri}: {describe(exc)}") from None
    return len(stale)


def previous_ok(out: Output) -> dict[str, dict[str, Any]]:
    """What earlier runs finished in OUT, by source URI: the latest ok or skipped row of each (only sealed
    files are read). A skipped row carries the doc_id of the ok row it stands for, and the size and
    modification time seen when it was skipped, so a merely touched file is hashed once, not every run.

    Reading them must succeed: treating an unreadable table as empty would redo finished documents and
    write a second ok row for each.
    """
    import pyarrow.dataset as pads

    try:
        files = sealed_files(out, "documents")
        if not files:
            return {}
        # The contract's schema: files from before a column existed read it as null.
        table = pads.dataset(files, schema=DOCUMENTS_SCHEMA, filesystem=out.fs, format="parquet").to_table(
            columns=["source_uri", "doc_id", "size_bytes", "source_mtime", "status", "run_id"],
            filter=pads.field("status").isin(["ok", "skipped"]) & pads.field("doc_id").is_valid(),
        )
    except Exception as exc:
        raise OutputError(explain(f"cannot read earlier results in {out.uri} to resume: {describe(exc)} "
                                  "(--no-resume processes everything)")) from None
    latest: dict[str, dict[str, Any]] = {}
    for row in sorted(table.to_pylist(), key=lambda r: r["run_id"]):  # run ids start with their UTC time
        latest[row["source_uri"]] = row
    return latest


def unchanged(prev: dict[str, Any], ref: DocumentRef) -> bool:
    """Whether a listed document is the one an earlier run finished: same size and modification time where
    both sides know them. Otherwise it is read again, and its bytes (doc_id) decide."""
    if ref.size_bytes is not None and prev["size_bytes"] != ref.size_bytes:
        return False
    return ref.mtime is None or prev["source_mtime"] is None or prev["source_mtime"] == ref.mtime


def sealed_files(out: Output, table: str) -> list[str]:
    """A table's finished Parquet files, in every partition folder (never the _tmp- ones being written)."""
    return [path for path in table_files(out, table, "part-") if path.endswith(".parquet")]


def table_files(out: Output, table: str, prefix: str) -> list[str]:
    """Files under a table's folder, in every partition folder, whose names start with ``prefix``; sorted."""
    from pyarrow.fs import FileSelector, FileType

    infos = out.fs.get_file_info(FileSelector(out.path(table), recursive=True, allow_not_found=True))
    return sorted(f.path for f in infos if f.type == FileType.File and f.base_name.startswith(prefix))


class TableWriter:
    """Rows of one table, rolled into Parquet files of at most ``rows_per_file`` rows."""

    def __init__(self, out: Output, table: str, schema: pa.Schema, run_id: str, rows_per_file: int,
                 partition: str = ""):
        self.out, self.table, self.schema, self.run_id = out, table, schema, run_id
        self.folder = f"{table}/{partition}" if partition else table  # e.g. pages/ingest_date=2026-11-25
        self.rows_per_file = rows_per_file
        self.files: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self.rows = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        while rows:
            if self._writer is None:
                self._open()
            take = rows[: self.rows_per_file - self._rows_in_file]
            rows = rows[len(take) :]
            self._writer.write_table(pa.Table.from_pylist(take, schema=self.schema))
            self._rows_in_file += len(take)
            self.rows += len(take)
            if self._rows_in_file >= self.rows_per_file:
                self._seal()

    def seal(self) -> None:
        """Finish the open file now (if it has rows); the next rows start a new one."""
        if self._writer is not None and self._rows_in_file:
            self._seal()

    def close(self) -> list[str]:
        if self._writer is None and not self.files:
            self._open()  # an empty file still carries the schema, so readers of the folder always work
        if self._writer is not None:
            self._seal()
        return self.files

    def _name(self) -> str:
        return f"{self.folder}/part-{self.run_id}-{len(self.files):05d}.parquet"

    def _open(self) -> None:
        final = self._name()
        out = self.out
        if out.rename:  # a local folder must exist; object stores have none to make
            out.fs.create_dir(out.path(self.folder), recursive=True)
        self._target = out.path(self.folder, "_tmp-" + os.path.basename(final)) if out.rename else out.path(final)
        self._stream = out.fs.open_output_stream(self._target)  # a multipart upload on S3
        self._writer = pq.ParquetWriter(self._stream, self.schema, compression="zstd")
        self._rows_in_file = 0

    def _seal(self) -> None:
        final = self._name()
        self._writer.close()
        self._stream.close()
        if self.out.rename:
            self.out.fs.move(self._target, self.out.path(final))
        self.files.append(final)
        self._writer = None


class DocumentLedger:
    """Turns the stream of document and page records into exactly one documents row per input."""

    def __init__(self, refs: list[DocumentRef], run_id: str, schema=None):
        self.run_id, self.schema = run_id, schema  # schema: extract.SchemaSpec when extracting
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
            st["page_rows"].append(rec)
            if rec["status"] != "ok":
                st["failed"] += 1
                st["first_error"] = st["first_error"] or (rec["error_type"], rec["error_message"], rec["page_number"])
        doc = st["doc"]
        if doc is not None and (
            doc["status"] != "ok"
            or (st["pages"] >= (doc["page_count"] or 0) and len(st["chunks"]) >= (doc.get("chunk_count") or 0))
        ):
            return self._finish(rec["source_uri"])
        return None

    def _finish(self, uri: str, lost: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        st = self.open.pop(uri, None) or _new_state()
        self.done.add(uri)
        return self._document_row(uri, st, lost), st["page_rows"]

    def skip(self, ref: DocumentRef, doc_id: str, run_id: str) -> dict[str, Any]:
        """The row for an input skipped at listing time: already ok in this output."""
        self.done.add(ref.source_uri)
        return {"doc_id": doc_id, "source_uri": ref.source_uri, "size_bytes": ref.size_bytes,
                "source_mtime": ref.mtime, "status": "skipped",
                "error_message": f"already ok in this output (run {run_id})", "run_id": self.run_id}

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
            "status": doc.get("status", "error"),
            "error_type": doc.get("error_type"),
            "error_message": doc.get("error_message"),
            "run_id": self.run_id,
        }
        if lost:
            row.update(status="error", error_type="lost", error_message=lost)
        elif row["status"] == "ok" and st["failed"]:
            etype, emsg, number = st["first_error"]
            total = row["page_count"]
            if st["failed"] >= total:
                row.update(status="error", error_type="all_pages_failed")
            else:
                row.update(status="partial", error_type=etype)
            row["error_message"] = f"{st['failed']} of {total} pages failed; first, page {number}: {etype}: {emsg}"
        if self.schema is not None and st["chunks"]:
            self._add_extraction(row, sorted(st["chunks"], key=lambda c: c["chunk_index"]))
        return row

    def _add_extraction(self, row: dict[str, Any], chunks: list[dict[str, Any]]) -> None:
        """One document's extraction from its chunks: merged in page order, then validated once more."""
        import json

        from pipeline.extract import merge_chunks

        row.update(schema_name=self.schema.name, schema_hash=self.schema.hash)
        failed = [c for c in chunks if c["status"] != "ok"]
        if failed:
            row.update(valid=False, validation_errors=[f"chunk {c['chunk_index'] + 1}: {c['error_type']}: "
                                                       f"{c['error_message']}" for c in failed])
            if row["status"] == "ok":
                row.update(status="partial", error_type="extraction_failed",
                           error_message=f"extraction failed on {len(failed)} of {len(chunks)} chunks")
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
    return {"doc": None, "pages": 0, "failed": 0, "first_error": None, "chunks": [], "page_rows": []}


class RunSink:
    """Consumes the run's result stream on the driver: writes pages as they come, documents as they complete."""

    def __init__(self, out: Output, run_id: str, refs: list[DocumentRef], rows_per_file: int, schema=None,
                 checkpoint_s: float = 300.0, partition: str = ""):
        self.out, self.run_id, self.checkpoint_s = out, run_id, checkpoint_s
        self._sealed_at = time.monotonic()
        self.pages = TableWriter(out, "pages", PAGES_SCHEMA, run_id, rows_per_file, partition)
        self.documents = TableWriter(out, "documents", DOCUMENTS_SCHEMA, run_id, rows_per_file, partition)
        self.ledger = DocumentLedger(refs, run_id, schema)
        self.page_counts: Counter[str] = Counter()
        self.doc_counts: Counter[str] = Counter()
        self.counters: Counter[str] = Counter(  # 0s shown too
            documents_opened_pdfium=0, pages_rendered_pdfium=0, documents_read=0, bytes_read=0,
            skipped_unchanged_listing=0, skipped_same_bytes=0)
        self.source_counts: Counter[str] = Counter()  # ok pages by text_source

    def consume(self, records: list[dict[str, Any]]) -> None:
        finished = []
        for rec in records:
            if rec["kind"] == DOCUMENT and rec.get("doc_id"):
                # What incremental runs cost: documents whose bytes were read (and hashed), and how many bytes.
                self.counters["documents_read"] += 1
                self.counters["bytes_read"] += rec.get("size_bytes") or 0
                if rec["status"] == "skipped":
                    self.counters["skipped_same_bytes"] += 1
            if rec["kind"] != DOCUMENT:
                self.counters["output_tokens"] += rec.get("output_tokens") or 0
            elif rec.get("renderer") == "pdfium":  # MuPDF gave up on the whole document
                self.counters["documents_opened_pdfium"] += 1
            if rec["kind"] == PAGE:
                self.counters["model_retries"] += rec.get("retries") or 0
                if rec.get("renderer") == "pdfium":  # those documents' pages, and pages MuPDF failed on
                    self.counters["pages_rendered_pdfium"] += 1
            if rec["kind"] == CHUNK:
                self.counters["extractions"] += 1
            done = self.ledger.add(rec)
            if done:
                finished.append(done)
        self._write(finished)

    def skip(self, ref: DocumentRef, doc_id: str, run_id: str) -> None:
        self.counters["skipped_unchanged_listing"] += 1  # never read: same URI, size and time as before
        self._write([(self.ledger.skip(ref, doc_id, run_id), [])])

    def _write(self, finished) -> None:
        stamp = {"run_id": self.run_id, "schema_version": CONTRACT_VERSION}
        page_rows = [{name: rec.get(name) for name in PAGES_SCHEMA.names} | stamp for _, pages in finished for rec in pages]
        doc_rows = [doc | stamp for doc, _ in finished]
        self.pages.write(page_rows)
        self.documents.write(doc_rows)
        self.page_counts.update(r["status"] for r in page_rows)
        self.source_counts.update(r["text_source"] for r in page_rows if r["status"] == "ok" and r["text_source"])
        self.doc_counts.update(r["status"] for r in doc_rows)
        if time.monotonic() - self._sealed_at >= self.checkpoint_s:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make finished work visible: pages first, so a visible documents row always has its pages."""
        self.pages.seal()
        self.documents.seal()
        self._sealed_at = time.monotonic()

    def close(self, *, config: dict[str, Any], started_at: str, finished_at: str, timings: dict[str, float],
              version: str, listing: dict[str, int], lake=None,
              engines: list[dict[str, Any]] | None = None, check=None) -> RunManifest:
        """Account for every input, close the tables, run ``lake`` (the Iceberg append, if any) on the
        closed files, and write the manifest last. ``check()`` (the run's lease) raises to stop before each
        step that writes: the final rows, the lake step and the manifest."""
        check = check or (lambda: None)
        check()
        self._write(self.ledger.finish_all())
        files = {"pages": self.pages.close(), "documents": self.documents.close()}  # pages first, as in checkpoint
        check()
        iceberg = lake() if lake else None
        check()
        manifest = RunManifest(
            run_id=self.run_id,
            docpipe_version=version,
            started_at=started_at,
            finished_at=finished_at,
            config=config,
            documents=dict(self.doc_counts) | {"total": sum(self.doc_counts.values())},
            pages=dict(self.page_counts) | {"total": sum(self.page_counts.values())},
            timings=timings,
            counters=dict(self.counters) | {f"listing_{k}": v for k, v in listing.items()}
            | {f"pages_{s.value}": self.source_counts[s.value] for s in TextSource},
            files=files,
            iceberg=iceberg,
            engines=engines or [],
        )
        self.out.write_bytes(f"_runs/{self.run_id}.json", json.dumps(manifest.model_dump(mode="json"), indent=2).encode())
        return manifest
