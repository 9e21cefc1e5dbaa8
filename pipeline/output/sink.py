"""Where results land: Parquet tables under OUT, the per-document ledger, and the run manifest.

Files are written under a name readers ignore (leading underscore) and renamed when
complete, so a dataset reader never sees half a file. ``_runs/<run_id>.json`` is written
last: its presence marks a finished run.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any


from docpipe.records import CHUNK, DOCUMENT, PAGE
from docpipe.sources import FILTERED_NAMED, DocumentRef
from docpipe.schemas import CONTRACT_VERSION, DOCUMENTS_SCHEMA, PAGES_SCHEMA, RunManifest, TextSource
from docpipe.output.ledger import DocumentLedger
from docpipe.output.store import Output
from docpipe.output.writer import TableWriter


class RunSink:
    """Consumes the run's result stream on the driver: writes pages as they come, documents as they complete."""

    def __init__(self, out: Output, run_id: str, refs: list[DocumentRef], rows_per_file: int, schema=None,
                 checkpoint_s: float = 300.0, partition: str = "", pages=None, markdown=None):
        """``pages``: the run's page selection (config.parse_pages spans); ``markdown``: an
        output.markdown.MarkdownWriter for --markdown, which gets each finished document."""
        self.out, self.run_id, self.checkpoint_s = out, run_id, checkpoint_s
        self._sealed_at = time.monotonic()
        self.pages = TableWriter(out, "pages", PAGES_SCHEMA, run_id, rows_per_file, partition)
        self.documents = TableWriter(out, "documents", DOCUMENTS_SCHEMA, run_id, rows_per_file, partition)
        self.ledger = DocumentLedger(refs, run_id, schema, pages)
        self.markdown = markdown
        self.page_counts: Counter[str] = Counter()
        self.doc_counts: Counter[str] = Counter()
        self.error_counts: Counter[str] = Counter()  # documents rows with status error or partial, by error_type
        self.pages_seen = 0  # pages back from the pipeline, written or not (progress: a page counts when it is done)
        self.counters: Counter[str] = Counter(  # 0s shown too
            documents_opened_pdfium=0, pages_rendered_pdfium=0, documents_read=0, bytes_read=0,
            skipped_unchanged_listing=0, skipped_failed_unchanged=0, skipped_same_bytes=0)
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
                self.pages_seen += 1
                self.counters["model_retries"] += rec.get("retries") or 0
                if rec.get("renderer") == "pdfium":  # those documents' pages, and pages MuPDF failed on
                    self.counters["pages_rendered_pdfium"] += 1
            if rec["kind"] == CHUNK:
                self.counters["extractions"] += 1
            done = self.ledger.add(rec)
            if done:
                finished.append(done)
        self._write(finished)

    def skip(self, ref: DocumentRef, verdict: str) -> None:
        """An input skipped at listing, unread: the same URI, size and time as an earlier run's row, ok then
        (``verdict`` "done") or failed for good ("failed"). It gets no row: its earlier row stands; the manifest
        counts it."""
        self.ledger.skip(ref)
        self.counters["skipped_failed_unchanged" if verdict == "failed" else "skipped_unchanged_listing"] += 1

    def _write(self, finished) -> None:
        stamp = {"run_id": self.run_id, "schema_version": CONTRACT_VERSION}
        page_rows = [{name: rec.get(name) for name in PAGES_SCHEMA.names} | stamp for _, pages in finished for rec in pages]
        doc_rows = [doc | stamp for doc, _ in finished]
        self.pages.write(page_rows)
        self.documents.write(doc_rows)
        if self.markdown is not None:  # documents skipped as done keep the file an earlier run wrote
            for doc, pages in finished:
                if doc["status"] != "skipped":
                    self.markdown.write(doc, pages)
                    self.counters["markdown_files"] += 1
        self.page_counts.update(r["status"] for r in page_rows)
        self.source_counts.update(r["text_source"] for r in page_rows if r["status"] == "ok" and r["text_source"])
        self.doc_counts.update(r["status"] for r in doc_rows)
        self.error_counts.update(r["error_type"] for r in doc_rows if r["status"] in ("error", "partial"))
        for r in doc_rows:
            if r.get("valid") is not None:  # an extraction, valid against its schema or not
                self.counters["extractions_valid" if r["valid"] else "extractions_not_valid"] += 1
        if time.monotonic() - self._sealed_at >= self.checkpoint_s:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make finished work visible: pages first, so a visible documents row always has its pages."""
        self.pages.seal()
        self.documents.seal()
        self._sealed_at = time.monotonic()

    def close(self, *, config: dict[str, Any], started_at: str, finished_at: str, timings: dict[str, float],
              version: str, listing: dict[str, int], lake=None,
              engines: list[dict[str, Any]] | None = None, check=None, filtered: list[str] = (),
              interrupted: str | None = None) -> RunManifest:
        """Account for every input, close the tables, run ``lake`` (the Iceberg append, if any) on the
        closed files, and write the manifest last. ``check()`` (the run's lease) raises to stop before each
        step that writes: the final rows, the lake step and the manifest.

        ``interrupted`` (the signal's name): seal what is finished and record the run as interrupted. Documents
        not finished get no row (they were not lost: the next run does them) and the lake step waits for the next
        run, which appends what this one sealed."""
        check = check or (lambda: None)
        check()
        if not interrupted:
            self._write(self.ledger.finish_all())
        files = {"pages": self.pages.close(), "documents": self.documents.close()}  # pages first, as in checkpoint
        check()
        iceberg = lake() if lake and not interrupted else None
        check()
        manifest = RunManifest(
            run_id=self.run_id,
            docpipe_version=version,
            status="interrupted" if interrupted else "finished",
            errors=dict(sorted(self.error_counts.items())),
            filtered=list(filtered)[:FILTERED_NAMED],
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
