"""Reading OUT back: the sealed Parquet files of its tables (pages/, documents/) and the run manifests (_runs/).

The one reader for resume, eval, report and the lake step. Files are read with the current contract's Arrow
schema, so a file written under an older CONTRACT_VERSION reads the columns it lacks as null. Only pyarrow is
imported (eval and report are light commands); errors are the storage layer's own, for each caller to word.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from docpipe.output.store import Output, sealed_files
from docpipe.schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA

SCHEMAS = {"pages": PAGES_SCHEMA, "documents": DOCUMENTS_SCHEMA}
_PART = re.compile(r"part-(?P<run>.+)-\d{5}\.parquet$")  # the writer's file name: part-<run_id>-<index>.parquet

__all__ = ["SCHEMAS", "file_rows", "files_by_run", "manifest_files", "read_manifest", "read_rows", "read_table",
           "run_ids", "sealed_files"]


def read_table(out: Output, table: str, columns: list[str] | None = None, *, files: list[str] | None = None,
               run_id: str | None = None, uris: Iterable[str] | None = None, statuses: Iterable[str] | None = None,
               not_null: Iterable[str] = ()):
    """Rows of ``table`` ("pages" or "documents") as an Arrow table with the contract's types.

    ``files``: the paths to read (default: every sealed file of the table, in all partitions); ``columns``: the
    columns wanted (default all); the filters keep rows of run ``run_id``, whose source_uri is in ``uris``, whose
    status is in ``statuses``, and whose ``not_null`` columns are set. No files: an empty table."""
    import pyarrow.dataset as pads

    schema = SCHEMAS[table]
    columns = list(columns) if columns is not None else schema.names
    files = sealed_files(out, table) if files is None else files
    if not files:
        return schema.empty_table().select(columns)
    conditions = [pads.field(name).is_valid() for name in not_null]
    if run_id is not None:
        conditions.append(pads.field("run_id") == run_id)
    if uris is not None:
        conditions.append(pads.field("source_uri").isin(sorted(uris)))
    if statuses is not None:
        conditions.append(pads.field("status").isin(list(statuses)))
    condition = None
    for c in conditions:
        condition = c if condition is None else condition & c
    # The contract's schema, not each file's: files from before a column existed read it as null.
    dataset = pads.dataset(files, schema=schema, filesystem=out.fs, format="parquet")
    return dataset.to_table(columns=columns, filter=condition)


def read_rows(out: Output, table: str, columns: list[str], **filters) -> list[dict[str, Any]]:
    """``read_table``'s rows as dicts, oldest run first (run ids start with their UTC start time), so a later
    row of the same document overrides an earlier one when the caller keys them. ``columns`` must hold run_id."""
    return sorted(read_table(out, table, columns, **filters).to_pylist(), key=lambda r: r["run_id"])


def files_by_run(out: Output, table: str) -> dict[str, list[str]]:
    """The table's sealed files grouped by the run that wrote them (read from the file name), runs oldest first."""
    runs: dict[str, list[str]] = {}
    for path in sealed_files(out, table):
        m = _PART.search(path)
        if m:
            runs.setdefault(m["run"], []).append(path)
    return dict(sorted(runs.items()))


def file_rows(out: Output, path: str) -> tuple[int, Any]:
    """(rows, modification time) of one Parquet file, from its footer: no row is read."""
    import pyarrow.parquet as pq

    info = out.fs.get_file_info(path)
    with out.fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows, info.mtime


def run_ids(out: Output) -> list[str]:
    """Finished runs in OUT (those with a manifest), oldest first: run ids start with their UTC start time."""
    from pyarrow.fs import FileSelector, FileType

    infos = out.fs.get_file_info(FileSelector(out.path("_runs"), allow_not_found=True))
    return sorted(i.base_name[: -len(".json")] for i in infos
                  if i.type == FileType.File and i.base_name.endswith(".json") and not i.base_name.startswith("_"))


def read_manifest(out: Output, run_id: str) -> dict[str, Any]:
    """A finished run's manifest (``_runs/<run_id>.json``) as written: a dict, whatever its contract version."""
    with out.fs.open_input_file(out.path("_runs", f"{run_id}.json")) as f:
        return json.loads(f.read())


def manifest_files(out: Output, manifest: dict[str, Any], table: str) -> list[str]:
    """The paths of the files a run's manifest lists for ``table``, in the order it lists them."""
    return [out.path(rel) for rel in manifest.get("files", {}).get(table, [])]
