"""The data-lake step: append finished rows to Apache Iceberg tables, one commit per run and table.

The Parquet dataset under OUT stays the source of truth. Each Iceberg snapshot records the
run it came from (``docpipe.run_id``), so the step is idempotent and catches up: rows that
an earlier run sealed but never appended (it crashed, or the catalog was down) are appended
by the next run, before its own.

Beside the two append-only tables, ``documents_current`` holds one row per source URI: its latest documents row
(an upsert on source_uri per run, in the same catch-up order), the current state a lake reader asks for.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pyarrow as pa

from docpipe.config import IcebergOptions
from docpipe.errors import OutputError, describe
from docpipe.output.store import Output
from docpipe.output.tables import files_by_run, read_table
from docpipe.schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA

RUN_PROPERTY = "docpipe.run_id"
_DATE = re.compile(r"ingest_date=(\d{4}-\d{2}-\d{2})/")


def append_runs(opts: IcebergOptions, out: Output) -> dict[str, Any]:
    """Append every run found in OUT that the Iceberg tables don't hold yet, oldest first.

    Returns what was appended: {"pages": {run_id: snapshot_id}, "documents": {...}, "documents_current": {...}}.
    """
    try:
        from pyiceberg.catalog import load_catalog
    except ImportError:
        raise OutputError("iceberg output needs pyiceberg: pip install 'docpipe[iceberg]'") from None
    try:
        catalog = load_catalog(opts.catalog_name, **opts.catalog)
        catalog.create_namespace_if_not_exists(opts.namespace)
        appended = {}
        for name, table_name, schema in (("pages", opts.pages_table, PAGES_SCHEMA),
                                         ("documents", opts.documents_table, DOCUMENTS_SCHEMA)):
            appended[name] = _append_table(catalog, f"{opts.namespace}.{table_name}", schema, out, name)
        appended["documents_current"] = _append_table(catalog, f"{opts.namespace}.{opts.current_table}",
                                                      DOCUMENTS_SCHEMA, out, "documents", upsert=True)
        return appended
    except OutputError:
        raise
    except Exception as exc:
        raise OutputError(f"iceberg append failed: {describe(exc)} (the rows are in {out.uri}; the next run "
                          "appends whatever is missing)") from None


def lake_schema(schema: pa.Schema) -> pa.Schema:
    """A table's Arrow schema with the partition column as a real column (Hive keeps it in folder names)."""
    return schema.append(pa.field("ingest_date", pa.date32(), nullable=False))


def _append_table(catalog, identifier: str, schema: pa.Schema, out: Output, name: str,
                  upsert: bool = False) -> dict[str, int]:
    """Each run of OUT's table ``name`` the Iceberg table lacks, oldest first, one commit each: appended, or with
    ``upsert`` merged on source_uri (a run has one documents row per URI: the URI's latest row replaces its last)."""
    full = lake_schema(schema)
    table = catalog.create_table_if_not_exists(identifier, schema=full)
    if set(full.names) - set(table.schema().column_names):
        # A newer contract adds columns: evolve the table (rows of older runs read them as null).
        with table.update_schema() as update:
            update.union_by_name(full)
    if not table.spec().fields:
        with table.update_spec() as spec:
            spec.add_identity("ingest_date")
    done = {s.summary.additional_properties.get(RUN_PROPERTY) for s in table.snapshots() if s.summary}
    runs = {run_id: paths for run_id, paths in files_by_run(out, name).items() if run_id not in done}
    appended = {}
    for run_id in sorted(runs):  # run ids begin with their start time
        parts = []
        for path in runs[run_id]:
            part = read_table(out, name, files=[path])  # one file at a time: its folder names its ingest date
            date = _DATE.search(path)
            day = dt.date.fromisoformat(date[1]) if date else dt.datetime.strptime(run_id[:8], "%Y%m%d").date()
            parts.append(part.append_column(full.field("ingest_date"), pa.array([day] * part.num_rows, pa.date32())))
        data = pa.concat_tables(parts)
        # One commit per run: readers see all of a run's rows or none of them.
        if upsert:
            if data.num_rows:
                with table.transaction() as tx:
                    tx.upsert(data, join_cols=["source_uri"], snapshot_properties={RUN_PROPERTY: run_id})
            else:  # nothing to merge; an empty commit still marks the run as done
                table.append(data, snapshot_properties={RUN_PROPERTY: run_id})
        else:
            table.append(data, snapshot_properties={RUN_PROPERTY: run_id})
        appended[run_id] = table.current_snapshot().snapshot_id
    return appended
