"""``docpipe run --dry-run``: what a run would process, filter out and skip (resume), and why, from the listing and
OUT's earlier rows alone. No document is read, nothing is written (no lease, no folders), no model or Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from docpipe.config import RunConfig
from docpipe.errors import OutputError, describe
from docpipe.execute.run import _check_documents_options, _check_schema, _list_inputs
from docpipe.output.resume import previous_ok, same_pages, unchanged
from docpipe.output.store import Output
from docpipe.storage import explain, register_secrets

PROCESS, SKIP, FILTERED = "process", "skip", "filtered"


@dataclass
class DryRun:
    """Each listed document's fate, in listing order: (action, URI, why); action process, skip or filtered."""

    output: str
    entries: list[tuple[str, str, str]] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for a, _, _ in self.entries if a == action)


def dry_run(config: RunConfig) -> DryRun:
    """The run ``config`` describes, planned and not run: see the module's docstring."""
    register_secrets(config.storage)
    _check_schema(config)  # the run's own checks, so a dry run fails where the run would
    _check_documents_options(config)
    listing = _list_inputs(config)
    out = Output(config.output, config.storage)
    result = DryRun(out.uri)
    done, last = {}, {}
    if config.resume:
        try:
            done = same_pages(out, previous_ok(out), config.page_spans)
            last = _latest_rows(out)
        except OutputError:
            raise
        except Exception as exc:
            raise OutputError(explain(f"cannot read earlier results in {out.uri}: {describe(exc)}")) from None
    for ref in listing.refs:
        prev, seen = done.get(ref.source_uri), last.get(ref.source_uri)
        if not config.resume:
            result.entries.append((PROCESS, ref.source_uri, "--no-resume"))
        elif prev and unchanged(prev, ref):
            result.entries.append((SKIP, ref.source_uri, f"unchanged since run {prev['run_id']}, where it was ok"))
        elif prev:
            what = "size" if ref.size_bytes is not None and prev["size_bytes"] != ref.size_bytes else "modified time"
            result.entries.append((PROCESS, ref.source_uri, f"its {what} changed since run {prev['run_id']}: read, "
                                   "and skipped if its bytes are the same"))
        elif seen and seen["status"] in ("ok", "skipped"):
            result.entries.append((PROCESS, ref.source_uri, f"done in run {seen['run_id']} under another --pages"))
        elif seen:
            result.entries.append((PROCESS, ref.source_uri, f"{seen['status']} in run {seen['run_id']} "
                                   f"({seen['error_type']}): tried again"))
        else:
            result.entries.append((PROCESS, ref.source_uri, "new"))
    result.entries += [(FILTERED, uri, why) for uri, why in listing.filtered]
    return result


def _latest_rows(out: Output) -> dict[str, dict]:
    """Each URI's latest documents row, whatever its status."""
    from docpipe.output.tables import read_rows

    latest = {}
    for row in read_rows(out, "documents", ["source_uri", "status", "error_type", "run_id"]):
        latest[row["source_uri"]] = row
    return latest
