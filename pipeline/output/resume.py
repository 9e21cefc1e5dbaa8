"""Resume: what earlier runs did with each listed document, so this run skips those unchanged since: the ones already
ok, and the ones that failed for good (a failure their bytes alone decide, which a retry would only repeat).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection

from docpipe.errors import OutputError, describe
from docpipe.output.store import Output
from docpipe.output.tables import read_rows
from docpipe.sources import DocumentRef
from docpipe.storage import explain
from docpipe.schemas import ErrorType

# Failures decided by the bytes alone: the same file fails the same way on every run. A document that failed so
# is not read again while it is unchanged (--retry-failed reads it). Read errors, timeouts, crashes, model errors
# and lost documents may pass next time, and are retried.
FOR_GOOD = frozenset({ErrorType.empty_file.value, ErrorType.unsupported_media_type.value,
                      ErrorType.corrupt_document.value, ErrorType.encrypted_document.value,
                      ErrorType.empty_document.value, ErrorType.image_too_large.value,
                      ErrorType.content_lost.value})

_COLUMNS = ["source_uri", "doc_id", "size_bytes", "source_mtime", "status", "error_type", "run_id"]


@dataclass
class History:
    """Per source URI, the latest documents row of earlier runs (``latest``) and the latest ok or skipped one
    (``done``); ``ok_ids``: the doc_ids known ok, whatever their URI."""

    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok_ids(self) -> frozenset[str]:
        return frozenset(r["doc_id"] for r in self.done.values() if r["doc_id"])

    def verdict(self, ref: DocumentRef, retry_failed: bool = False, retry: Collection[str] = ()) -> str | None:
        """"done" (ok before, unchanged), "failed" (failed for good before, unchanged), or None: process it.
        ``retry``: error types tried again all the same (encrypted_document, when the run has passwords)."""
        latest = self.latest.get(ref.source_uri)
        if (not retry_failed and latest and latest["status"] in ("error", "partial")
                and latest["error_type"] in FOR_GOOD - set(retry) and latest["doc_id"] and unchanged(latest, ref)):
            return "failed"
        done = self.done.get(ref.source_uri)
        return "done" if done and unchanged(done, ref) else None


def history(out: Output) -> History:
    """What earlier runs did in OUT (only sealed files are read). A skipped row (its bytes were already ok under
    another URI) carries the doc_id of the ok row it stands for, and the size and modification time seen then.

    Reading them must succeed: treating an unreadable table as empty would redo finished documents and
    write a second ok row for each.
    """
    try:
        rows = read_rows(out, "documents", _COLUMNS)
    except Exception as exc:
        raise OutputError(explain(f"cannot read earlier results in {out.uri} to resume: {describe(exc)} "
                                  "(--no-resume processes everything)")) from None
    seen = History()
    for row in rows:  # oldest run first: the latest row of each URI stays
        seen.latest[row["source_uri"]] = row
        if row["status"] in ("ok", "skipped") and row["doc_id"]:
            seen.done[row["source_uri"]] = row
    return seen


def under_selection(out: Output, seen: History, pages) -> History:
    """``seen`` less the rows written under another page selection (--pages) than ``pages`` (the run's,
    config.parse_pages spans): a document done, or found to have no such page, under another selection is processed
    again. Each row's run says in its manifest which selection it had (none: every page); each manifest is read once."""
    selections = _selections(out, {row["run_id"] for rows in (seen.latest, seen.done) for row in rows.values()}, pages)

    def kept(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {uri: row for uri, row in rows.items() if selections[row["run_id"]] == pages}

    return History(latest=kept(seen.latest), done=kept(seen.done))


def _selections(out: Output, run_ids: set[str], pages) -> dict[str, Any]:
    """Each run's page selection, from its manifest."""
    from docpipe.config import parse_pages
    from docpipe.output.tables import read_manifest

    selections: dict[str, Any] = {}
    for run_id in run_ids:
        try:
            text = read_manifest(out, run_id).get("config", {}).get("pages")
        except OSError:  # no manifest: a run that was killed; its rerun (this one, as a rule) has its options
            selections[run_id] = pages
            continue
        selections[run_id] = parse_pages(text) if text else None
    return selections


def unchanged(prev: dict[str, Any], ref: DocumentRef) -> bool:
    """Whether a listed document is the one an earlier run saw: same size and modification time where both
    sides know them. Otherwise it is read again, and its bytes (doc_id) decide."""
    if ref.size_bytes is not None and prev["size_bytes"] != ref.size_bytes:
        return False
    return ref.mtime is None or prev["source_mtime"] is None or prev["source_mtime"] == ref.mtime
