"""Resume: which documents an earlier run already finished with the same bytes, so this run can skip them."""

from __future__ import annotations

from typing import Any


from docpipe.errors import OutputError, describe
from docpipe.output.store import Output
from docpipe.output.tables import read_rows
from docpipe.sources import DocumentRef
from docpipe.storage import explain


def previous_ok(out: Output) -> dict[str, dict[str, Any]]:
    """What earlier runs finished in OUT, by source URI: the latest ok or skipped row of each (only sealed
    files are read). A skipped row carries the doc_id of the ok row it stands for, and the size and
    modification time seen when it was skipped, so a merely touched file is hashed once, not every run.

    Reading them must succeed: treating an unreadable table as empty would redo finished documents and
    write a second ok row for each.
    """
    try:
        rows = read_rows(out, "documents", ["source_uri", "doc_id", "size_bytes", "source_mtime", "status", "run_id"],
                         statuses=["ok", "skipped"], not_null=["doc_id"])
    except Exception as exc:
        raise OutputError(explain(f"cannot read earlier results in {out.uri} to resume: {describe(exc)} "
                                  "(--no-resume processes everything)")) from None
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:  # oldest run first: the latest row of each URI stays
        latest[row["source_uri"]] = row
    return latest


def same_pages(out: Output, done: dict[str, dict[str, Any]], pages) -> dict[str, dict[str, Any]]:
    """``done`` less the documents finished under another page selection (--pages) than ``pages`` (the run's,
    config.parse_pages spans): each row's run says in its manifest which it had (none: every page)."""
    from docpipe.config import parse_pages
    from docpipe.output.tables import read_manifest

    selections: dict[str, Any] = {}
    for run_id in {row["run_id"] for row in done.values()}:
        try:
            text = read_manifest(out, run_id).get("config", {}).get("pages")
        except OSError:  # no manifest: a run that was killed; its rerun (this one, as a rule) has its options
            selections[run_id] = pages
            continue
        selections[run_id] = parse_pages(text) if text else None
    return {uri: row for uri, row in done.items() if selections[row["run_id"]] == pages}


def unchanged(prev: dict[str, Any], ref: DocumentRef) -> bool:
    """Whether a listed document is the one an earlier run finished: same size and modification time where
    both sides know them. Otherwise it is read again, and its bytes (doc_id) decide."""
    if ref.size_bytes is not None and prev["size_bytes"] != ref.size_bytes:
        return False
    return ref.mtime is None or prev["source_mtime"] is None or prev["source_mtime"] == ref.mtime
