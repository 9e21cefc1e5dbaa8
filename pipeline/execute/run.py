"""One run, as a flow: list the inputs, check the extraction schema, take the output's lease, skip what an earlier
run finished or found failing for good (resume), execute the rest (execute/local.py in this process, execute/plan.py
on Ray), then close the run: its manifest, and the lake step. SIGINT and SIGTERM end it early: what is finished is
sealed and the run recorded as interrupted, so a rerun redoes nothing sealed.

The executors only decide where the stages run; the results come back here, to the sink that writes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import threading
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
from docpipe.output.resume import History, history, under_selection
from docpipe.output.sink import RunSink
from docpipe.output.store import prepare_output, remove_skeleton, remove_stale_tmp
from docpipe.sources import list_inputs
from docpipe.storage import register_secrets
from docpipe.schemas import RunManifest


@dataclass
class RunResult:
    """A finished run: its manifest (``_runs/<run_id>.json``) and its output's URI."""

    manifest: RunManifest
    output: str

    @property
    def record(self) -> str:
        """The run's record (manifest): OUT/_runs/RUN_ID.json."""
        return f"{self.output}/_runs/{self.manifest.run_id}.json"

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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended the run; what was finished is sealed, and ``record`` names the run's manifest."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.record, self.documents = signum, None, 0


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def run(config: RunConfig) -> RunResult:
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0, wall_t0 = time.perf_counter(), time.time()
    register_secrets(config.storage)
    _check_model_path(config)
    schema = _check_schema(config)  # a bad schema fails here, before any document is read
    _check_documents_options(config)
    listing = _list_inputs(config)
    out = prepare_output(config.output, config.storage)
    run_id = new_run_id()
    lease = _take_lease(config, out.uri, run_id, started_at)  # before earlier results are read or files removed
    released = finished = False
    try:
        with _signals_end_run() as stop:
            result = _run_leased(config, out, run_id, lease, schema, listing, started_at, t0, wall_t0, stop)
        finished = True
        return result
    finally:
        if lease is not None:
            try:
                lease.release()
                released = True
            except LeaseLost as exc:  # taken over before it was given back: its new holder's now, left alone
                print(f"docpipe: warning: did not release the lease on {out.uri}: {exc}", file=sys.stderr)
            except Exception as exc:  # must not hide the run's own error; the lease then simply expires
                print(f"docpipe: warning: could not release the lease on {out.uri}: {describe(exc)} (it expires "
                      f"within {config.lease_expiry_s:g} s)", file=sys.stderr)
        if not finished and (released or lease is None):
            remove_skeleton(out)  # a run that failed before writing anything leaves no empty output behind


def _check_model_path(config: RunConfig) -> None:
    """A model named as a path (./x, ../x, /x, ~/x) must be a folder: say so, not what the hub makes of the name."""
    from docpipe.errors import ConfigError

    name = config.model.name
    if name.startswith(("./", "../", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise ConfigError(f"no such model folder: {name}")


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
    listing = list_inputs(config.inputs, config.manifests, config.include, config.exclude, config.storage,
                          case_sensitive=config.case_sensitive_globs)
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
                wall_t0: float, stop: _Stop) -> RunResult:
    """The run proper, under the output's lease."""
    refs = listing.refs
    stale = remove_stale_tmp(out, keep_run=run_id)
    partition = "" if config.partition_by == "none" else f"ingest_date={started_at[:10]}"
    sink = RunSink(out, run_id, refs, config.rows_per_file, schema, config.checkpoint_s, partition,
                   pages=config.page_spans, markdown=markdown_writer(config, refs))
    sink.counters["stale_tmp_files_removed"] = stale
    todo, skip_ids = _resume(config, out, refs, sink)
    longest_edge = None
    if todo:  # nothing new: no model, not even its processor's sizes, is looked at
        checkpoint = resolve_checkpoint(config.model.name)
        longest_edge = config.render.longest_edge or render_edge_for(checkpoint, config.model)
        if config.model.adapter:
            from docpipe.tools.finetune import adapter_mismatches

            for problem in adapter_mismatches(config.model.adapter, config, longest_edge):
                print(f"docpipe: warning: {problem}", file=sys.stderr)

    first_ready, engines, interrupted = None, {}, None
    execute = execute_local if config.fail_fast or config.executor == "local" else execute_ray
    progress = Progress(sink, len(todo), config.progress_interval_s, enabled=bool(todo) and own_progress(config))
    try:
        with progress:
            # all done: nothing to run, and no Ray started
            for records in execute(config, todo, longest_edge, skip_ids, schema=schema) if todo else ():
                ready = [r["actor_ready_at"] for r in records if r.get("actor_ready_at")]
                if ready:
                    first_ready = min(ready + [first_ready] if first_ready else ready)
                for rec in records:
                    if rec.get("actor_engine"):  # the latest report of each actor (its peak only grows)
                        engine = json.loads(rec["actor_engine"])
                        engines[engine["actor"]] = engine
                _check_lease(lease)  # before writing: a run that lost its lease writes nothing more
                with stop.deferred():  # a signal now waits until the records are written
                    sink.consume(records)
    except KeyboardInterrupt as exc:  # SIGINT (or SIGTERM, through _signals_end_run): seal what is finished
        # Ray's waits turn an interrupt into a KeyboardInterrupt of their own: the signal is the one stop saw
        interrupted = exc if isinstance(exc, Interrupted) else Interrupted(stop.signum or signal.SIGINT)
        stop.ignore()  # sealing is short: a second Ctrl-C must not cut it

    pages_seen = sink.pages_seen
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
        filtered=[uri for uri, _ in listing.filtered],
        interrupted=interrupted and signal.Signals(interrupted.signum).name,
    )
    result = RunResult(manifest, out.uri)
    if interrupted:
        interrupted.record, interrupted.documents = result.record, manifest.documents["total"]
        raise interrupted
    return result


def own_progress(config: RunConfig) -> bool:
    """Whether docpipe prints its own progress lines (and keeps Ray's bars and log lines off stderr): unless Ray
    Data's bars were asked for and stderr is a terminal to draw them on."""
    return not (config.progress and sys.stderr.isatty())


def retried_anyway(config: RunConfig) -> frozenset[str]:
    """Failures for good that this run tries again all the same: an encrypted PDF, when the run has passwords."""
    from docpipe.render.passwords import load_passwords

    return frozenset({"encrypted_document"}) if load_passwords(config) else frozenset()


def _resume(config: RunConfig, out, refs, sink: RunSink):
    """The documents still to do, and the ids earlier runs found ok; the sink counts the ones skipped unchanged
    (ok before, or failed for good before: see output/resume.py) under this run's page selection."""
    seen = under_selection(out, history(out), config.page_spans) if config.resume else History()
    retry = retried_anyway(config)
    todo = []
    for ref in refs:
        verdict = seen.verdict(ref, config.retry_failed, retry)
        if verdict:
            sink.skip(ref, verdict)
        else:
            todo.append(ref)
    return todo, seen.ok_ids


class _Stop:
    """SIGINT and SIGTERM during a run: raised as Interrupted in the main thread, except while records are being
    written (``deferred``: raised once they are), and not at all once the run is sealing what it finished."""

    def __init__(self):
        self.signum, self.deferring, self.ignoring = None, False, False

    def handle(self, signum, frame) -> None:
        if self.ignoring:
            return
        self.signum = signum
        if not self.deferring:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.signum is not None and not self.ignoring:
            raise Interrupted(self.signum)

    def ignore(self) -> None:
        self.ignoring = True


@contextlib.contextmanager
def _signals_end_run():
    """Route SIGINT and SIGTERM to a _Stop for the run's duration (main thread only: Python delivers signals
    there; elsewhere the defaults stand). Ray's init sets its own SIGTERM handler; execute/cluster.py puts ours back."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    saved = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


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
