"""One run, as a flow: list the inputs, check the extraction schema, take the output's lease, skip what an earlier
run finished (resume), execute the rest (execute/local.py in this process, execute/plan.py on Ray), then close
the run: its manifest, and the lake step.

The executors only decide where the stages run; the results come back here, to the sink that writes them.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from dataclasses import dataclass

from docpipe import __version__
from docpipe.config import RunConfig
from docpipe.errors import InputError, describe
from docpipe.execute.local import execute_local
from docpipe.execute.plan import execute_ray
from docpipe.execute.progress import Progress
from docpipe.model.load import render_edge_for, resolve_checkpoint
from docpipe.output.lease import LeaseLost
from docpipe.output.resume import previous_ok, unchanged
from docpipe.output.sink import RunSink
from docpipe.output.store import prepare_output, remove_stale_tmp
from docpipe.sources import list_inputs
from docpipe.storage import register_secrets
from docpipe.schemas import RunManifest


@dataclass
class RunResult:
    """A finished run: its manifest (``_runs/<run_id>.json``) and its output's URI."""

    manifest: RunManifest
    output: str

    def documents(self, columns: list[str] | None = None, storage=None):
        """This run's documents rows, an Arrow table (``.to_pandas()``, ``.to_pylist()``); ``storage``: a
        config.StorageOptions for an object store the environment does not describe."""
        return self._table("documents", columns, storage)

    def pages(self, columns: list[str] | None = None, storage=None):
        """This run's pages rows, an Arrow table (see ``documents``)."""
        return self._table("pages", columns, storage)

    def _table(self, table: str, columns, storage):
        from docpipe.output.store import Output
        from docpipe.output.tables import manifest_files, read_table

        out = Output(self.output, storage)
        files = manifest_files(out, self.manifest.model_dump(), table)
        return read_table(out, table, columns, files=files)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def run(config: RunConfig) -> RunResult:
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0, wall_t0 = time.perf_counter(), time.time()
    register_secrets(config.storage)
    schema = _check_schema(config)  # a bad schema fails here, before any document is read
    _check_documents_options(config)
    listing = _list_inputs(config)
    out = prepare_output(config.output, config.storage)
    run_id = new_run_id()
    lease = _take_lease(config, out.uri, run_id, started_at)  # before earlier results are read or files removed
    try:
        return _run_leased(config, out, run_id, lease, schema, listing, started_at, t0, wall_t0)
    finally:
        if lease is not None:
            try:
                lease.release()
            except LeaseLost as exc:  # taken over before it was given back: its new holder's now, left alone
                print(f"docpipe: warning: did not release the lease on {out.uri}: {exc}", file=sys.stderr)
            except Exception as exc:  # must not hide the run's own error; the lease then simply expires
                print(f"docpipe: warning: could not release the lease on {out.uri}: {describe(exc)} (it expires "
                      f"within {config.lease_expiry_s:g} s)", file=sys.stderr)


def _check_schema(config: RunConfig):
    """The extraction schema, loaded and compiled to a grammar; None for OCR alone."""
    if "extract" not in config.task:
        return None
    from docpipe.errors import ConfigError
    from docpipe.extract.grammar import build_grammar
    from docpipe.extract.schema import load_schema

    if not config.extract.schema_spec:
        raise ConfigError(f"task {config.task} needs a schema (--schema)")
    schema = load_schema(config.extract.schema_spec)
    build_grammar(schema.json_schema, config.extract)
    return schema


def _check_documents_options(config: RunConfig) -> None:
    """--markdown, --password and --passwords, checked before any document is read."""
    from docpipe.errors import ConfigError
    from docpipe.render.passwords import load_passwords

    if config.markdown and config.task == "extract":
        raise ConfigError("--markdown writes the pages' text, which task extract does not read: use task ocr or "
                          "ocr+extract")
    load_passwords(config)  # unreadable files are fatal here; the render stage gets them through stages.render_args


def markdown_writer(config: RunConfig, refs):
    """The --markdown writer, naming files relative to the folder that holds every INPUT (and every document
    a manifest lists), so a rerun with the same inputs gives each document the same name."""
    if not config.markdown:
        return None
    from docpipe.output.markdown import MarkdownWriter, common_folder, input_folder, _segments

    listed = {r.source_uri for r in refs}
    folders = [input_folder(arg, listed) for arg in config.inputs]
    if config.manifests:
        folders += [_segments(uri)[:-1] for uri in listed]
    return MarkdownWriter(config.markdown, common_folder(folders), config.storage)


def _list_inputs(config: RunConfig):
    """The documents to account for: the inputs and manifests, filtered; an error when there are none."""
    if not config.inputs and not config.manifests:
        raise InputError("no inputs: give INPUT paths or URIs, or --manifest")
    listing = list_inputs(config.inputs, config.manifests, config.include, config.exclude, config.storage)
    if not listing.refs:
        raise InputError("no files to process in: " + " ".join(config.inputs + config.manifests)
                         + (f" ({listing.filtered_out} listed, all filtered out)" if listing.filtered_out else ""))
    return listing


def _take_lease(config: RunConfig, uri: str, run_id: str, started_at: str):
    """This run's lease on OUT (pipeline/output/lease.py), or None where the store has no conditional writes."""
    from docpipe.errors import OutputError
    from docpipe.output.lease import Lease, LeaseBusy, LeaseLost, LeaseUnsupported, store_for
    from docpipe.storage import explain

    store = store_for(uri, config.storage, config.lease_expiry_s)
    if store is None:
        print(f"docpipe: warning: no lease on {uri} (only local folders and S3 have one): nothing stops another "
              "run from writing there at the same time", file=sys.stderr)
        return None
    lease = Lease(store, run_id, config.lease_expiry_s, started_at)
    try:
        store.probe()  # conditional writes (S3), hard links and locks (local): missing ones fail here, in one line
        lease.acquire(config.wait_for_output_s, poll_s=min(2.0, config.lease_expiry_s / 10),
                      on_wait=lambda holder: print(
                          f"docpipe: waiting for {holder.describe()} to finish with {uri} (its lease expires at "
                          f"{holder.expiry_text()} unless renewed)", file=sys.stderr, flush=True))
    except LeaseBusy as exc:
        waited = f" (waited {config.wait_for_output_s:g} s)" if config.wait_for_output_s else ""
        raise OutputError(f"output {uri} is in use by {exc.holder.describe()}; its lease expires at "
                          f"{exc.holder.expiry_text()} unless renewed{waited} (--wait-for-output [SECONDS] waits "
                          "for it)") from None
    except LeaseLost as exc:
        raise OutputError(f"cannot take the lease on output {uri}: {exc}") from None
    except LeaseUnsupported as exc:
        raise OutputError(f"output {uri} cannot hold a lease: {exc}") from None
    except Exception as exc:  # the store's own errors: a missing bucket, refused credentials
        raise OutputError(explain(f"cannot take the lease on output {uri}: {describe(exc)}")) from None
    if lease.took_over is not None:
        print(f"docpipe: warning: took over the lease on {uri} from {lease.took_over.describe()}: its process is "
              "gone or its lease expired; its unfinished files are removed", file=sys.stderr)
    return lease


def _run_leased(config: RunConfig, out, run_id: str, lease, schema, listing, started_at: str, t0: float,
                wall_t0: float) -> RunResult:
    """The run proper, under the output's lease."""
    refs = listing.refs
    stale = remove_stale_tmp(out, keep_run=run_id)
    checkpoint = resolve_checkpoint(config.model.name)
    longest_edge = config.render.longest_edge or render_edge_for(checkpoint, config.model)
    if config.model.adapter:
        from docpipe.tools.finetune import adapter_mismatches

        for problem in adapter_mismatches(config.model.adapter, config, longest_edge):
            print(f"docpipe: warning: {problem}", file=sys.stderr)
    partition = "" if config.partition_by == "none" else f"ingest_date={started_at[:10]}"
    sink = RunSink(out, run_id, refs, config.rows_per_file, schema, config.checkpoint_s, partition,
                   pages=config.page_spans, markdown=markdown_writer(config, refs))
    sink.counters["stale_tmp_files_removed"] = stale
    todo, skip_ids = _resume(config, out, refs, sink)

    pages_seen, first_ready, engines = 0, None, {}
    execute = execute_local if config.fail_fast or config.executor == "local" else execute_ray
    progress = Progress(sink, len(refs), config.progress_interval_s,
                        enabled=not (config.progress and sys.stderr.isatty()))
    with progress:
        for records in execute(config, todo, longest_edge, skip_ids) if todo else ():  # all done: nothing to run
            pages_seen += sum(1 for r in records if r["kind"] == "page")
            ready = [r["actor_ready_at"] for r in records if r.get("actor_ready_at")]
            if ready:
                first_ready = min(ready + [first_ready] if first_ready else ready)
            for rec in records:
                if rec.get("actor_engine"):  # the latest report of each actor (its peak only grows)
                    engine = json.loads(rec["actor_engine"])
                    engines[engine["actor"]] = engine
            _check_lease(lease)  # before writing: a run that lost its lease writes nothing more
            sink.consume(records)

    wall = time.perf_counter() - t0
    timings = {"wall_s": round(wall, 3), "pages_per_s": round(pages_seen / wall, 4) if wall else 0.0}
    if first_ready:
        timings["model_ready_s"] = round(first_ready - wall_t0, 3)
    manifest = sink.close(
        config=config.model_dump(mode="json"),
        started_at=started_at,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        timings=timings,
        version=__version__,
        listing={"documents": len(refs), "filtered_out": listing.filtered_out},
        lake=_lake_step(config, out),
        engines=sorted(engines.values(), key=lambda e: e["actor"]),
        check=lambda: _check_lease(lease),
    )
    return RunResult(manifest, out.uri)


def _resume(config: RunConfig, out, refs, sink: RunSink):
    """The documents still to do, and the ids earlier runs wrote; the sink records the ones skipped as done."""
    from docpipe.output.resume import same_pages

    done = same_pages(out, previous_ok(out), config.page_spans) if config.resume else {}
    todo = []
    for ref in refs:
        prev = done.get(ref.source_uri)
        if prev and unchanged(prev, ref):
            sink.skip(ref, prev["doc_id"], prev["run_id"])
        else:
            todo.append(ref)
    return todo, frozenset(r["doc_id"] for r in done.values())


def _check_lease(lease) -> None:
    """Stop writing once another run has taken this run's lease over (it missed renewals past the expiry)."""
    from docpipe.errors import OutputError
    from docpipe.output.lease import LeaseLost

    if lease is None:
        return
    try:
        lease.check()
    except LeaseLost as exc:
        raise OutputError(f"stopped: {exc}") from None


def _lake_step(config: RunConfig, out):
    if not config.iceberg.catalog:
        return None
    from docpipe.output.lake import append_runs

    return lambda: append_runs(config.iceberg, out)
