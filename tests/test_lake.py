"""Scheduled, incremental runs into a data lake: Hive partitions, a schema version, DuckDB read-back, Iceberg."""

import datetime as dt
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image

from docpipe.schemas import CONTRACT_VERSION
from tests.conftest import run_cli


def manifests(out):
    return sorted((json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")), key=lambda m: m["run_id"])


def docs_of(out, run_id):
    return {d["source_uri"].rsplit("/", 1)[-1]: d for d in pq.read_table(out / "documents").to_pylist()
            if d["run_id"] == run_id}


@pytest.fixture(scope="module")
def nightly(sample_docs, tmp_path_factory):
    """Three scheduled runs over a growing folder: the first without the Iceberg step (so the second must
    catch it up), the second after a new, a changed and a touched file, the third with nothing new."""
    root = tmp_path_factory.mktemp("nightly")
    inbox = root / "inbox"
    inbox.mkdir()
    for name in ("receipt.png", "scan.jpg", "minutes.pdf"):
        shutil.copy(sample_docs / name, inbox / name)
    (inbox / "empty.pdf").write_bytes(b"")  # fails for good: read by the first run only
    catalog = {"type": "sql", "uri": f"sqlite:///{root / 'catalog.db'}", "warehouse": f"file://{root / 'warehouse'}"}
    config = root / "nightly.yaml"
    config.write_text(json.dumps({
        # the local executor: partitions, incremental skips and the Iceberg step are the sink's and the run's,
        # the same under Ray (whose output contract tests/test_fidelity.py and tests/test_s3.py prove)
        "inputs": [str(inbox)], "output": str(root / "out"), "progress": False, "executor": "local",
        "model": {"name": "tiny-random", "max_new_tokens": 2},
    }))
    with_iceberg = root / "nightly-iceberg.yaml"
    with_iceberg.write_text(json.dumps({**json.loads(config.read_text()), "iceberg": {"catalog": catalog}}))

    runs = [run_cli("run", "--config", config)]
    Image.new("RGB", (300, 200), "white").save(inbox / "new.png")
    with open(inbox / "scan.jpg", "ab") as f:
        f.write(b"\0" * 16)  # changed: new size (JPEG readers ignore bytes after the end marker)
    later = (inbox / "receipt.png").stat().st_mtime + 3600
    os.utime(inbox / "receipt.png", (later, later))  # touched: new modification time, same bytes
    runs.append(run_cli("run", "--config", with_iceberg, "--progress-interval", "0.01"))
    runs.append(run_cli("run", "--config", with_iceberg))
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root, runs, catalog


def test_incremental_runs_process_only_new_and_changed_documents(nightly):
    root, runs, _ = nightly
    out = root / "out"
    first, second, third = manifests(out)
    assert first["documents"] == {"ok": 3, "error": 1, "total": 4} and first["errors"] == {"empty_file": 1}
    assert second["documents"] == {"ok": 2, "skipped": 1, "total": 3}
    d2 = docs_of(out, second["run_id"])
    assert d2["new.png"]["status"] == d2["scan.jpg"]["status"] == "ok"
    assert "minutes.pdf" not in d2 and "empty.pdf" not in d2  # unchanged (ok, or failed for good): no row
    # touched, not changed: read again, recognised by its bytes, and recorded with its new time
    assert d2["receipt.png"]["status"] == "skipped" and "same bytes" in d2["receipt.png"]["error_message"]
    mtime = dt.datetime.fromtimestamp((root / "inbox" / "receipt.png").stat().st_mtime, dt.timezone.utc)
    assert abs((d2["receipt.png"]["source_mtime"] - mtime).total_seconds()) < 1e-3
    # what each run read tells a skip at listing (never read) from a skip after hashing (read, same bytes)
    inbox = root / "inbox"
    assert first["counters"]["documents_read"] == 4 and first["counters"]["skipped_unchanged_listing"] == 0
    c2 = second["counters"]
    assert (c2["skipped_unchanged_listing"], c2["skipped_failed_unchanged"], c2["skipped_same_bytes"],
            c2["documents_read"]) == (1, 1, 1, 3)
    assert c2["bytes_read"] == sum((inbox / n).stat().st_size for n in ("new.png", "scan.jpg", "receipt.png"))
    # nothing new: nothing is read, nothing reaches the model, and the documents table does not grow
    assert third["documents"] == {"total": 0} and third["pages"]["total"] == 0
    c3 = third["counters"]
    assert (c3["skipped_unchanged_listing"], c3["skipped_failed_unchanged"]) == (4, 1)
    assert c3["documents_read"] == c3["bytes_read"] == 0
    assert docs_of(out, third["run_id"]) == {}
    ok = [d for d in pq.read_table(out / "documents").to_pylist() if d["status"] == "ok"]
    assert sorted(d["source_uri"].rsplit("/", 1)[-1] for d in ok) == ["minutes.pdf", "new.png", "receipt.png",
                                                                      "scan.jpg", "scan.jpg"]  # scan.jpg changed


def test_output_is_a_hive_partitioned_dataset_that_duckdb_reads(nightly):
    duckdb = pytest.importorskip("duckdb")
    root, _, _ = nightly
    out = root / "out"
    runs = manifests(out)
    day_of = {m["run_id"]: dt.date.fromisoformat(m["started_at"][:10]) for m in runs}  # runs may span midnight
    for m in runs:
        assert all(f.startswith(f"{t}/ingest_date={m['started_at'][:10]}/part-") for t, fs in m["files"].items()
                   for f in fs)
    con = duckdb.connect()
    docs = con.execute(
        f"SELECT run_id, status, ingest_date, schema_version, source_mtime FROM read_parquet("
        f"'{out}/documents/*/part-*.parquet', hive_partitioning = true)").fetchall()
    assert len(docs) == sum(m["documents"]["total"] for m in runs) == 7
    assert all(r[2] == day_of[r[0]] for r in docs) and {r[3] for r in docs} == {CONTRACT_VERSION}
    assert all(isinstance(r[4], dt.datetime) for r in docs)
    pages = con.execute(
        f"SELECT count(*), count(DISTINCT source_uri) FROM read_parquet('{out}/pages/*/part-*.parquet', "
        "hive_partitioning = true) WHERE status = 'ok'").fetchone()
    assert pages == (sum(m["pages"].get("ok", 0) for m in runs), 4)
    # a run writes one file per table (rows_per_file and checkpoints set the size), not one per batch
    assert all(len(fs) == 1 for m in runs for fs in m["files"].values())
    # the current state of every file: its latest row (the query docs/lake.md gives)
    current = con.execute(CURRENT_STATE.format(out=out)).fetchall()
    state = {uri.rsplit("/", 1)[-1]: (status, error_type, run_id) for uri, status, error_type, run_id in current}
    first, second, third = (m["run_id"] for m in runs)
    assert state == {"minutes.pdf": ("ok", None, first), "empty.pdf": ("error", "empty_file", first),
                     "new.png": ("ok", None, second), "scan.jpg": ("ok", None, second),
                     "receipt.png": ("skipped", None, second)}


# docs/lake.md's current-state query, as written there (OUT filled in)
CURRENT_STATE = """
SELECT source_uri, status, error_type, run_id
FROM read_parquet('{out}/documents/**/part-*.parquet', hive_partitioning = true)
QUALIFY row_number() OVER (PARTITION BY source_uri ORDER BY run_id DESC) = 1
"""


def test_each_run_is_one_iceberg_commit_and_the_first_is_caught_up(nightly):
    from pyiceberg.catalog import load_catalog

    root, _, catalog = nightly
    out = root / "out"
    first, second, third = manifests(out)
    assert first["iceberg"] is None  # that run had no catalog configured
    assert set(second["iceberg"]["documents"]) == {first["run_id"], second["run_id"]}  # caught up, oldest first
    assert set(third["iceberg"]["documents"]) == {third["run_id"]}  # appended once, never twice
    table = load_catalog("docpipe", **catalog).load_table("docpipe.documents")
    snapshots = [s.summary.additional_properties for s in table.snapshots()]
    assert [s["docpipe.run_id"] for s in snapshots] == [first["run_id"], second["run_id"], third["run_id"]]
    assert [int(s.get("added-records", 0)) for s in snapshots] == [4, 3, 0]  # an empty commit has no count
    rows = table.scan().to_arrow().to_pylist()
    dataset = pq.read_table(out / "documents").to_pylist()
    key = lambda r: (r["run_id"], r["source_uri"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, dataset))
    assert all(r["ingest_date"] == dt.date.fromisoformat(m["started_at"][:10]) for m in (first, second, third)
               for r in rows if r["run_id"] == m["run_id"])
    # partitioned by ingest_date (identity), as docs/lake.md says
    [field] = table.spec().fields
    assert (table.schema().find_field(field.source_id).name, str(field.transform)) == ("ingest_date", "identity")
    # documents_current: one row per file, its latest row, merged run by run (the first run caught up too)
    current = load_catalog("docpipe", **catalog).load_table("docpipe.documents_current").scan().to_arrow()
    latest = {}
    for r in sorted(dataset, key=lambda r: r["run_id"]):
        latest[r["source_uri"]] = (r["run_id"], r["status"])
    assert sorted((r["source_uri"], (r["run_id"], r["status"])) for r in current.to_pylist()) == sorted(latest.items())
    assert len(latest) == 5 and set(second["iceberg"]["documents_current"]) == {first["run_id"], second["run_id"]}
    pages = load_catalog("docpipe", **catalog).load_table("docpipe.pages").scan().to_arrow()
    assert pages.num_rows == pq.read_table(out / "pages").num_rows
    assert "sqlite" in json.dumps(second["config"]["iceberg"])  # recorded, with credentials masked


def test_runs_without_progress_bars_log_progress_lines(nightly):
    _, runs, _ = nightly
    lines = [ln for ln in runs[1].stderr.splitlines() if ln.startswith("docpipe: progress:")]
    assert lines and "documents 3/3" in lines[-1] and "pages/s" in lines[-1]  # the 3 read; 2 unchanged are not
    assert "documents  3 (ok 2, skipped 1)" in runs[1].stdout  # and the summary table at the end
    assert "unchanged  2 not read: 1 ok before, 1 failed for good before (--retry-failed reads them)" in runs[1].stdout


def test_a_catalog_outage_fails_the_append_and_a_later_append_catches_up(nightly, tmp_path):
    from docpipe.config import IcebergOptions
    from docpipe.errors import OutputError
    from docpipe.output.lake import append_runs
    from docpipe.output.store import Output

    root, _, _ = nightly
    out = Output(str(root / "out"))
    down = {"type": "sql", "uri": f"sqlite:///{tmp_path}/unreachable/catalog.db", "warehouse": f"file://{tmp_path}/wh"}
    with pytest.raises(OutputError, match="iceberg append failed: .*the next run appends whatever is missing"):
        append_runs(IcebergOptions(catalog=down), out)
    back = {**down, "uri": f"sqlite:///{tmp_path}/catalog.db"}
    appended = append_runs(IcebergOptions(catalog=back), out)
    run_ids = [m["run_id"] for m in manifests(root / "out")]
    assert list(appended["documents"]) == list(appended["pages"]) == list(appended["documents_current"]) == run_ids
    assert append_runs(IcebergOptions(catalog=back), out) == {"pages": {}, "documents": {}, "documents_current": {}}


SINCE_V3 = {"pages": ["route_reason", "blocks", "text_layer_analysis"], "documents": ["repaired"]}  # contracts 4, 5
MANIFEST_SINCE_V3 = ("status", "errors", "filtered")  # contract 5's manifest fields


def test_an_output_of_contract_v3_is_appended_and_resumed_beside_v5_runs(nightly, tmp_path):
    """A lake table made by contract v3, and an output whose first run is a v3 run not yet appended (its files lack
    every column contracts 4 and 5 added, its record the fields 5 added): the tables gain the columns by name, the
    v3 rows read them as null, the later rows keep theirs; and a rerun resumes from the v3 rows, reading nothing."""
    import pyarrow as pa
    from pyiceberg.catalog import load_catalog

    from docpipe.config import IcebergOptions, RunConfig
    from docpipe.execute.run import run
    from docpipe.output.lake import append_runs, lake_schema
    from docpipe.output.store import Output
    from docpipe.output.tables import read_table
    from docpipe.schemas import PAGES_SCHEMA

    root, _, _ = nightly
    old = tmp_path / "out"
    shutil.copytree(root / "out", old)
    first = manifests(old)[0]
    for table, columns in SINCE_V3.items():
        for rel in first["files"][table]:
            pq.write_table(pq.read_table(old / rel).drop_columns(columns), old / rel)
    (old / "_runs" / f"{first['run_id']}.json").write_text(json.dumps(
        {k: v for k, v in first.items() if k not in MANIFEST_SINCE_V3} | {"contract_version": 3}))
    catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"file://{tmp_path}/wh"}
    v3 = pa.schema([f for f in PAGES_SCHEMA if f.name not in SINCE_V3["pages"]])
    cat = load_catalog("docpipe", **catalog)
    cat.create_namespace_if_not_exists("docpipe")
    cat.create_table("docpipe.pages", schema=lake_schema(v3))
    appended = append_runs(IcebergOptions(catalog=catalog), Output(str(old)))
    assert list(appended["pages"]) == list(appended["documents"]) == [m["run_id"] for m in manifests(old)]
    lake = load_catalog("docpipe", **catalog)
    for table, columns in SINCE_V3.items():
        # the same run's rows as written (contract 5) do hold values there: the nulls below are the missing columns'
        written = [r for r in pq.read_table(root / "out" / table).to_pylist() if r["run_id"] == first["run_id"]]
        assert all(any(r[c] is not None for r in written) for c in columns), (table, written)
        read = read_table(Output(str(old)), table, run_id=first["run_id"]).to_pylist()  # resume's, report's reader
        assert len(read) == len(written) and all(r[c] is None for r in read for c in columns)
        rows = [r for r in lake.load_table(f"docpipe.{table}").scan().to_arrow().to_pylist()
                if r["run_id"] == first["run_id"]]
        assert len(rows) == len(written)
        for c in columns:
            # pyiceberg 0.12 writes a null list<struct> as an empty list (apache/iceberg-python#3833): blocks null
            # comes back [], whichever contract wrote the row (a model page's too)
            assert all(r[c] == [] if c == "blocks" else r[c] is None for r in rows), (c, rows)
        if table == "pages":
            rows = lake.load_table("docpipe.pages").scan().to_arrow().to_pylist()
            # the second run's pages: new.png is blank, the changed scan.jpg went to the model (an image: no text
            # layer)
            assert sorted(r["route_reason"] for r in rows if r["run_id"] != first["run_id"]) == ["blank",
                                                                                                  "no_text_layer"]
    # minutes.pdf (ok) and empty.pdf (failed for good) have rows in the v3 run alone: a rerun skips them unread
    rerun = run(RunConfig(**{**json.loads((root / "nightly.yaml").read_text()), "output": str(old)})).manifest
    assert rerun.documents == {"total": 0} and rerun.counters["documents_read"] == 0
    assert (rerun.counters["skipped_unchanged_listing"], rerun.counters["skipped_failed_unchanged"]) == (4, 1)
