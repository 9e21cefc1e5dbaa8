import pyarrow.parquet as pq

from docpipe.output.ledger import DocumentLedger

from docpipe.output.store import Output

from docpipe.output.writer import TableWriter
from docpipe.sources import DocumentRef
from docpipe.schemas import CONTRACT_VERSION, PAGES_SCHEMA


def doc(uri, status="ok", pages=2, **kw):
    return {"kind": "document", "source_uri": uri, "doc_id": "d", "status": status, "page_count": pages, **kw}


def page(uri, n, status="ok", **kw):
    return {"kind": "page", "source_uri": uri, "page_number": n, "status": status, "error_type": None,
            "error_message": None, **kw}


def test_ledger_finishes_a_document_once_all_pages_arrive_in_any_order():
    ledger = DocumentLedger([DocumentRef("a"), DocumentRef("b")], "run")
    assert ledger.add(page("a", 2)) is None
    assert ledger.add(doc("a")) is None
    row, pages = ledger.add(page("a", 1))
    assert row["status"] == "ok" and row["error_type"] is None
    assert sorted(p["page_number"] for p in pages) == [1, 2]  # pages are held until their document is done
    row, pages = ledger.add(doc("b", status="error", pages=None, error_type="corrupt_document"))
    assert row["status"] == "error" and pages == []
    assert ledger.finish_all() == []


def test_ledger_marks_partial_and_all_failed_documents():
    ledger = DocumentLedger([DocumentRef("a"), DocumentRef("b")], "run")
    ledger.add(doc("a"))
    ledger.add(page("a", 1))
    row, _ = ledger.add(page("a", 2, status="error", error_type="render_error", error_message="boom"))
    assert row["status"] == "partial" and row["error_type"] == "render_error"
    assert row["error_message"] == "1 of 2 pages failed; first, page 2: render_error: boom"
    ledger.add(doc("b", pages=1))
    row, _ = ledger.add(page("b", 1, status="error", error_type="model_error", error_message="x"))
    assert row["status"] == "error" and row["error_type"] == "all_pages_failed"


def test_ledger_records_documents_that_never_came_back():
    ledger = DocumentLedger([DocumentRef("a", 10), DocumentRef("b", 20)], "run")
    ledger.add(doc("a", pages=3))
    ledger.add(page("a", 1))
    rows = {r["source_uri"]: r for r, _ in ledger.finish_all()}
    assert rows["a"]["status"] == "error" and rows["a"]["error_type"] == "lost"
    assert "only 1 of 3 pages" in rows["a"]["error_message"]
    assert rows["b"]["error_type"] == "lost" and rows["b"]["size_bytes"] == 20


def test_table_writer_rolls_files_and_renames_them_when_complete(tmp_path):
    (tmp_path / "pages").mkdir()
    w = TableWriter(Output(str(tmp_path)), "pages", PAGES_SCHEMA, "r1", rows_per_file=2)
    rows = [dict(doc_id="d", source_uri="s", page_number=i, page_count=5, status="ok", run_id="r1", schema_version=CONTRACT_VERSION)
            for i in range(1, 6)]
    w.write(rows[:3])
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == ["_tmp-part-r1-00001.parquet",
                                                                       "part-r1-00000.parquet"]
    assert pq.read_table(tmp_path / "pages").num_rows == 2  # readers skip the file still being written
    w.write(rows[3:])
    assert w.close() == ["pages/part-r1-00000.parquet", "pages/part-r1-00001.parquet", "pages/part-r1-00002.parquet"]
    assert pq.read_table(tmp_path / "pages")["page_number"].to_pylist() == [1, 2, 3, 4, 5]


def test_table_writer_leaves_an_empty_file_with_the_schema(tmp_path):
    (tmp_path / "pages").mkdir()
    w = TableWriter(Output(str(tmp_path)), "pages", PAGES_SCHEMA, "r1", rows_per_file=10)
    assert w.close() == ["pages/part-r1-00000.parquet"]
    assert pq.read_table(tmp_path / "pages").schema.names == PAGES_SCHEMA.names


def test_resume_refuses_to_guess_when_earlier_results_are_unreadable(tmp_path):
    import pytest

    from docpipe.errors import OutputError
    from docpipe.output.resume import history
    from docpipe.output.store import prepare_output

    out = prepare_output(str(tmp_path / "out"))
    assert history(out).latest == {}  # no earlier run
    (tmp_path / "out" / "documents").mkdir()
    (tmp_path / "out" / "documents" / "part-r0-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(OutputError, match="cannot read earlier results"):
        history(out)


def test_stale_tmp_files_of_killed_runs_are_removed(tmp_path):
    from docpipe.output.store import prepare_output, remove_stale_tmp

    out = prepare_output(str(tmp_path / "out"))
    part = tmp_path / "out" / "pages" / "ingest_date=2026-11-25"
    part.mkdir(parents=True)
    (part / "_tmp-part-r0-00000.parquet").write_bytes(b"half")
    (part / "part-r0-00000.parquet").write_bytes(b"sealed")
    (part / "_tmp-part-r1-00000.parquet").write_bytes(b"this run's open file")
    assert remove_stale_tmp(out, keep_run="r1") == 1  # only the caller, the lease holder, is run r1
    assert sorted(p.name for p in part.iterdir()) == ["_tmp-part-r1-00000.parquet", "part-r0-00000.parquet"]


def test_close_stops_before_the_lake_step_and_the_manifest_once_the_lease_is_lost(tmp_path):
    """``check`` (the run's lease) is asked before each writing step of close: lost after the tables are
    closed, the lake step never runs and no manifest is written."""
    import pytest

    from docpipe.output.sink import RunSink

    from docpipe.output.store import prepare_output

    out = prepare_output(str(tmp_path / "out"))
    sink = RunSink(out, "r1", [DocumentRef("a.pdf")], rows_per_file=10)
    asked, lake_ran = [], []

    def check():
        asked.append(len(asked))
        if len(asked) == 2:  # the first call passes (before the final rows); the second, after the tables
            raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError, match="lease lost"):
        sink.close(config={}, started_at="2026-01-01T00:00:00Z", finished_at="2026-01-01T00:00:01Z", timings={},
                   version="0", listing={}, lake=lambda: lake_ran.append(1), check=check)
    assert asked == [0, 1] and lake_ran == []
    assert not (tmp_path / "out" / "_runs").exists() or not list((tmp_path / "out" / "_runs").iterdir())


def test_progress_counts_pages_as_they_come_back(tmp_path, capsys):
    """A long document's pages count as they arrive, not only once all of it is written."""
    from docpipe.execute.progress import Progress
    from docpipe.output.sink import RunSink
    from docpipe.output.store import prepare_output
    from docpipe.sources import DocumentRef

    sink = RunSink(prepare_output(str(tmp_path / "out")), "r1", [DocumentRef("a.pdf")], rows_per_file=10)
    sink.consume([{"kind": "document", "source_uri": "a.pdf", "doc_id": "d", "status": "ok", "page_count": 3}]
                 + [{"kind": "page", "source_uri": "a.pdf", "doc_id": "d", "page_number": n, "page_count": 3,
                     "status": "ok", "text": "t"} for n in (1, 2)])
    assert sink.pages_seen == 2 and sum(sink.page_counts.values()) == 0  # not written yet: its page 3 is due
    Progress(sink, 1, 30, enabled=True).report()
    assert "documents 0/1, pages 2 " in capsys.readouterr().err
