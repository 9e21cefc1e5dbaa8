"""``docpipe run --dry-run``: what a run would process, filter out and skip (resume), and why, from the listing and
OUT's earlier rows alone. No document is read, nothing is written (no lease, no folders), no model or Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from docpipe.config import RunConfig
from docpipe.errors import OutputError, describe
from docpipe.execute.run import _check_documents_options, _check_schema, _list_inputs, retried_anyway
from docpipe.output.resume import History, history, under_selection
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
    everything = selected = History()
    if config.resume:
        try:
            everything = history(out)
            selected = under_selection(out, everything, config.page_spans)
        except OutputError:
            raise
        except Exception as exc:
            raise OutputError(explain(f"cannot read earlier results in {out.uri}: {describe(exc)}")) from None
    retry = retried_anyway(config)
    for ref in listing.refs:
        prev, seen = selected.done.get(ref.source_uri), everything.latest.get(ref.source_uri)
        verdict = selected.verdict(ref, config.retry_failed, retry)
        if not config.resume:
            result.entries.append((PROCESS, ref.source_uri, "--no-resume"))
        elif verdict == "done":
            result.entries.append((SKIP, ref.source_uri, f"unchanged since run {prev['run_id']}, where it was ok"))
        elif verdict == "failed":
            result.entries.append((SKIP, ref.source_uri, f"unchanged since run {seen['run_id']}, where it failed for "
                                   f"good ({seen['error_type']}): --retry-failed reads it"))
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
