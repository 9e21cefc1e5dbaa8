"""docpipe.output.tables: reading OUT's sealed Parquet files and run manifests back, written by the real sink."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from docpipe.output import tables
from docpipe.output.sink import RunSink
from docpipe.output.store import prepare_output
from docpipe.sources import DocumentRef
from docpipe.schemas import DOCUMENTS_SCHEMA


def _run(out, run_id: str, docs: dict[str, str]) -> dict:
    """One finished run through RunSink: each document (uri -> page status) has one page."""
    sink = RunSink(out, run_id, [DocumentRef(uri) for uri in docs], rows_per_file=10)
    for uri, status in docs.items():
        error = {"error_type": "render_error", "error_message": "boom"} if status == "error" else {}
        sink.consume([{"kind": "document", "source_uri": uri, "doc_id": f"id-{uri}", "status": "ok", "page_count": 1},
                      {"kind": "page", "source_uri": uri, "doc_id": f"id-{uri}", "page_number": 1, "page_count": 1,
                       "status": status, "text": f"{uri} in {run_id}", **error}])
    manifest = sink.close(config={}, started_at="2026-01-01T00:00:00Z", finished_at="2026-01-01T00:00:01Z",
                          timings={}, version="0", listing={})
    return manifest.model_dump(mode="json")


def test_reads_sealed_rows_with_projection_and_filters(tmp_path):
    out = prepare_output(str(tmp_path / "out"))
    _run(out, "20260101T000000Z-a", {"a.pdf": "ok", "b.pdf": "error"})
    _run(out, "20260102T000000Z-b", {"a.pdf": "ok"})
    (tmp_path / "out" / "documents" / "_tmp-part-20260103T000000Z-c-00000.parquet").write_bytes(b"half a file")

    docs = tables.read_table(out, "documents", ["source_uri", "status", "run_id"])
    assert docs.column_names == ["source_uri", "status", "run_id"]
    assert sorted(docs.to_pylist(), key=lambda r: (r["run_id"], r["source_uri"])) == [
        {"source_uri": "a.pdf", "status": "ok", "run_id": "20260101T000000Z-a"},
        {"source_uri": "b.pdf", "status": "error", "run_id": "20260101T000000Z-a"},
        {"source_uri": "a.pdf", "status": "ok", "run_id": "20260102T000000Z-b"}]
    assert tables.read_table(out, "documents", ["source_uri"], statuses=["error"]).to_pylist() == [
        {"source_uri": "b.pdf"}]
    only_b = tables.read_table(out, "pages", ["text"], run_id="20260102T000000Z-b", uris={"a.pdf", "z.pdf"})
    assert only_b.to_pylist() == [{"text": "a.pdf in 20260102T000000Z-b"}]
    assert tables.read_table(out, "pages", ["text"], not_null=["error_type"]).to_pylist() == [
        {"text": "b.pdf in 20260101T000000Z-a"}]
    # Oldest run first, so keying the rows keeps the latest of each document.
    latest = {r["source_uri"]: r["run_id"] for r in tables.read_rows(out, "documents", ["source_uri", "run_id"])}
    assert latest == {"a.pdf": "20260102T000000Z-b", "b.pdf": "20260101T000000Z-a"}


def test_an_empty_output_reads_as_empty_tables_with_the_contract_types(tmp_path):
    out = prepare_output(str(tmp_path / "out"))
    empty = tables.read_table(out, "documents", ["source_uri", "size_bytes"])
    assert empty.num_rows == 0 and empty.schema == DOCUMENTS_SCHEMA.empty_table().select(["source_uri",
                                                                                         "size_bytes"]).schema
    assert tables.read_rows(out, "pages", ["run_id"]) == []
    assert tables.run_ids(out) == [] and tables.files_by_run(out, "pages") == {}


def test_files_of_an_older_contract_read_the_columns_they_lack_as_null(tmp_path):
    out = prepare_output(str(tmp_path / "out"))
    _run(out, "20260102T000000Z-new", {"new.pdf": "ok"})
    # A documents file from before the extraction and source_mtime columns existed.
    old_fields = [f for f in DOCUMENTS_SCHEMA if f.name not in ("source_mtime", "extraction", "valid")]
    row = {"doc_id": "id-old", "source_uri": "old.pdf", "status": "ok", "run_id": "20251201T000000Z-old",
           "schema_version": 2, "size_bytes": 7}
    old = pa.table({f.name: pa.array([row.get(f.name)], f.type) for f in old_fields}, schema=pa.schema(old_fields))
    pq.write_table(old, tmp_path / "out" / "documents" / "part-20251201T000000Z-old-00000.parquet")

    rows = tables.read_rows(out, "documents", ["source_uri", "size_bytes", "source_mtime", "extraction", "run_id"])
    assert rows[0] == {"source_uri": "old.pdf", "size_bytes": 7, "source_mtime": None, "extraction": None,
                       "run_id": "20251201T000000Z-old"}
    assert [r["source_uri"] for r in rows] == ["old.pdf", "new.pdf"]
    whole = tables.read_table(out, "documents", files=tables.files_by_run(out, "documents")["20251201T000000Z-old"])
    assert whole.schema.names == DOCUMENTS_SCHEMA.names and whole.num_rows == 1


def test_manifests_and_the_files_they_list(tmp_path):
    out = prepare_output(str(tmp_path / "out"))
    first = _run(out, "20260101T000000Z-a", {"a.pdf": "ok", "b.pdf": "ok"})
    _run(out, "20260102T000000Z-b", {"c.pdf": "ok"})
    (tmp_path / "out" / "_runs" / "_tmp-20260103T000000Z-c.json").write_text("{")  # a manifest being written

    assert tables.run_ids(out) == ["20260101T000000Z-a", "20260102T000000Z-b"]
    manifest = tables.read_manifest(out, "20260101T000000Z-a")
    assert manifest == first and manifest["documents"]["total"] == 2
    files = tables.manifest_files(out, manifest, "pages")
    assert len(files) == 1 and files == tables.files_by_run(out, "pages")["20260101T000000Z-a"]
    rows, mtime = tables.file_rows(out, files[0])
    assert rows == 2 and mtime is not None
    assert tables.read_table(out, "pages", ["source_uri"], files=files).num_rows == 2


def test_the_reader_imports_no_heavy_library():
    code = ("import sys, docpipe.output.tables; "
            "print([m for m in ('torch', 'ray', 'transformers', 'fitz', 'pymupdf') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
