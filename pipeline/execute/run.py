"""The Ray wiring, and the only module that knows about Ray.

One Ray Data plan per run: inputs -> read and render (CPU tasks, lazily, page by page)
-> model (a fixed-size actor pool, one actor per GPU) -> the driver's sink, which writes
Parquet as results stream in and accounts for every input document. Fine-tuning with
several workers runs its loop (pipeline/tools/finetune.py) under Ray Train (``finetune``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline import __version__
from pipeline.config import FinetuneConfig, RunConfig
from pipeline.render.document import expand_document
from pipeline.render.isolated import expand_document_isolated
from pipeline.errors import InputError, describe
from pipeline.model.load import render_edge_for, resolve_checkpoint
from pipeline.records import RENDERED_SCHEMA, RESULT_SCHEMA, to_table
from pipeline.output.sink import RunSink
from pipeline.output.store import prepare_output, remove_stale_tmp
from pipeline.output.resume import previous_ok, unchanged
from pipeline.sources import list_inputs
from pipeline.storage import register_secrets
from schemas import RunManifest


@dataclass
class RunResult:
    manifest: RunManifest
    output: str



def _expand_documents(batch, **render_args):
    """Ray Data UDF: document refs in, one-record tables out; a generator, so pages stream out lazily."""
    register_secrets(render_args["storage"])
    for uri in batch.column("source_uri").to_pylist():
        for rec in expand_document_isolated(uri, **render_args):
            yield to_table([rec], RENDERED_SCHEMA)


def _render_args(config: RunConfig, longest_edge: int, skip_ids: frozenset[str]) -> dict[str, Any]:
    """expand_document's settings for this run, the same for both executors."""
    return {
        "opts": config.render,
        "longest_edge": longest_edge,
        "storage": config.storage,
        "ocr": "ocr" in config.task.split("+"),
        "chunk_pages": config.extract.page_cap if "extract" in config.task else None,
        "skip_ids": skip_ids,
        "route": config.route,
    }


def _model_actor(model_opts, extract_opts, task: str):
    """Ray Data actor UDF around the model stages; the model loads once per actor, in __init__.

    The options are bound in the class rather than passed as constructor arguments, which
    Ray would park in the object store where an actor restart could lose them.
    """

    class ModelActor:
        def __init__(self):
            from pipeline.model.load import load_model
            from pipeline.ocr import OcrStage

            loaded = load_model(model_opts)
            # OCR passes chunk records through untouched; extraction passes page records through.
            self.ocr = OcrStage(model_opts, loaded=loaded)
            self.stages = [self.ocr]
            if "extract" in task:
                from pipeline.extract.stage import ExtractStage

                self.stages.append(ExtractStage(model_opts, extract_opts, loaded))
            self.ready_at = time.time()  # tells the driver when the model could start work
            self.actor = f"{socket.gethostname()}:{os.getpid()}"
            # With the continuous engine several calls run at once (threads): its OCR takes them all; a stage
            # that drives generate() takes one at a time.
            self.lock = threading.RLock()  # re-entered: a generate actor's call holds it around its stages
            self.calls = self.peak_calls = 0  # calls running at once: several with the continuous engine
            self.count_lock = threading.Lock()

        def __call__(self, batch):
            _maybe_die()
            _maybe_hold()
            # Calls in flight follow the engine that runs, not the one asked for: Ray may hand a generate actor
            # (asked for, or fallen back to at start or mid-run) several calls, and it runs them one at a time.
            with contextlib.nullcontext() if self.ocr.engine.streams else self.lock:
                with self.count_lock:
                    self.calls += 1
                    self.peak_calls = max(self.peak_calls, self.calls)
                try:
                    return self._run(batch)
                finally:
                    with self.count_lock:
                        self.calls -= 1

        def _run(self, batch):
            records = batch.to_pylist()
            for stage in self.stages:
                if stage is self.ocr and self.ocr.engine.streams:
                    records = stage(records)
                else:
                    with self.lock:
                        records = stage(records)
            engine = json.dumps(self.ocr.engine_record | {
                "actor": self.actor, "peak_calls_in_flight": self.peak_calls,
                "peak_pages_in_flight": getattr(self.ocr.engine, "peak_pages_in_flight", None)  # after a fallback:
                or self.ocr.engine_record.get("peak_pages_in_flight")})  # the dead continuous engine's figure
            for rec in records:
                rec["actor_ready_at"] = self.ready_at
                rec["actor_engine"] = engine
            return to_table(records, RESULT_SCHEMA)

    return ModelActor


def _maybe_die() -> None:
    """Fault injection for tests: if DOCPIPE_FAULT_DIE_ONCE names an existing file, remove it and kill this
    process, as a crashed GPU worker would die. Ray restarts the actor and retries its batch."""
    marker = os.environ.get("DOCPIPE_FAULT_DIE_ONCE")
    if marker:
        try:
            os.remove(marker)
        except FileNotFoundError:
            return
        os._exit(1)


def _maybe_hold() -> None:
    """Fault injection for tests: if DOCPIPE_FAULT_HOLD_MODEL names a folder, each model call first creates
    FOLDER/NODE_ID.PID there (an actor on that node holds work) and then waits until FOLDER/release exists: a test
    kills a node once an actor on it holds pages, and the run cannot end before the test lets it (an event, not a
    guess at timing)."""
    folder = os.environ.get("DOCPIPE_FAULT_HOLD_MODEL")
    if folder:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        open(os.path.join(folder, f"{node}.{os.getpid()}"), "w").close()
        while not os.path.exists(os.path.join(folder, "release")):
            time.sleep(0.05)


class Progress:
    """Periodic progress lines on stderr, for runs without progress bars: batch jobs, Ray Jobs (whose logs
    are not a terminal, so Ray Data's bars are off), --no-progress. From a thread of their own, so a run stuck
    on a slow page still says so on time."""

    def __init__(self, sink: RunSink, total: int, interval_s: float, enabled: bool):
        self.sink, self.total, self.interval_s, self.enabled = sink, total, interval_s, enabled
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="docpipe-progress", daemon=True)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.enabled and exc_type is None:
            self.report()  # the final count, so a log ends with where the run got to

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.report()

    def report(self) -> None:
        now = time.monotonic()
        # Copies (single C-level dict copies under the GIL): the driver updates the counts meanwhile.
        docs, pages = dict(self.sink.doc_counts), dict(self.sink.page_counts)
        done, page_total = sum(docs.values()), sum(pages.values())
        errors = docs.get("error", 0) + docs.get("partial", 0)
        print(f"docpipe: progress: documents {done}/{self.total}, pages {page_total} "
              f"({page_total / (now - self.t0):.2f} pages/s), documents with errors {errors}, "
              f"pages with errors {pages.get('error', 0)}", file=sys.stderr, flush=True)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray instance bound to loopback."""
    from pipeline.execute import cluster

    address = os.environ.get("RAY_ADDRESS") or None
    token_given = False
    if address is None or cluster.is_loopback(address):
        # A local instance needs no other host: without this, Ray listens on every interface and advertises
        # the machine's network address. A head joined on loopback is on this machine: without this, Ray
        # swaps 127.0.0.1 for the network address, where a head bound to loopback never answers. Read when
        # Ray is first imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address is not None:
        token_given = cluster.use_token_auth()  # before Ray is imported, which reads the mode once
    import ray

    if ray.is_initialized():
        return
    if address is None:
        # "local": a new instance, even if `ray start` left a cluster on this machine (ray.init() would join it)
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    else:
        with cluster.joining(address, token_given):
            ray.init(address=address, include_dashboard=False, logging_level="WARNING")


def run(config: RunConfig) -> RunResult:
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0, wall_t0 = time.perf_counter(), time.time()
    register_secrets(config.storage)
    schema = None
    if "extract" in config.task:
        from pipeline.errors import ConfigError
        from pipeline.extract.grammar import build_grammar
        from pipeline.extract.schema import load_schema

        if not config.extract.schema_spec:
            raise ConfigError(f"task {config.task} needs a schema (--schema)")
        schema = load_schema(config.extract.schema_spec)  # a bad schema fails here, before any document is read
        build_grammar(schema.json_schema, config.extract)
    if not config.inputs and not config.manifests:
        raise InputError("no inputs: give INPUT paths or URIs, or --manifest")
    listing = list_inputs(config.inputs, config.manifests, config.include, config.exclude, config.storage)
    refs = listing.refs
    if not refs:
        raise InputError("no files to process in: " + " ".join(config.inputs + config.manifests)
                         + (f" ({listing.filtered_out} listed, all filtered out)" if listing.filtered_out else ""))
    out = prepare_output(config.output, config.storage)
    run_id = new_run_id()
    lease = _take_lease(config, out.uri, run_id, started_at)  # before earlier results are read or files removed
    try:
        return _run_leased(config, out, run_id, lease, schema, listing, started_at, t0, wall_t0)
    finally:
        if lease is not None:
            try:
                lease.release()
            except Exception as exc:  # must not hide the run's own error; the lease then simply expires
                print(f"docpipe: warning: could not release the lease on {out.uri}: {describe(exc)} (it expires "
                      f"within {config.lease_expiry_s:g} s)", file=sys.stderr)


def _take_lease(config: RunConfig, uri: str, run_id: str, started_at: str):
    """This run's lease on OUT (pipeline/output/lease.py), or None where the store has no conditional writes."""
    from pipeline.errors import OutputError
    from pipeline.output.lease import Lease, LeaseBusy, LeaseLost, store_for
    from pipeline.storage import explain

    store = store_for(uri, config.storage, config.lease_expiry_s)
    if store is None:
        print(f"docpipe: warning: no lease on {uri} (only local folders and S3 have one): nothing stops another "
              "run from writing there at the same time", file=sys.stderr)
        return None
    lease = Lease(store, run_id, config.lease_expiry_s, started_at)
    try:
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
        from pipeline.tools.finetune import adapter_mismatches

        for problem in adapter_mismatches(config.model.adapter, config, longest_edge):
            print(f"docpipe: warning: {problem}", file=sys.stderr)
    partition = "" if config.partition_by == "none" else f"ingest_date={started_at[:10]}"
    sink = RunSink(out, run_id, refs, config.rows_per_file, schema, config.checkpoint_s, partition)
    sink.counters["stale_tmp_files_removed"] = stale
    done = previous_ok(out) if config.resume else {}
    todo = []
    for ref in refs:
        prev = done.get(ref.source_uri)
        if prev and unchanged(prev, ref):
            sink.skip(ref, prev["doc_id"], prev["run_id"])
        else:
            todo.append(ref)
    skip_ids = frozenset(r["doc_id"] for r in done.values())

    pages_seen, first_ready, engines = 0, None, {}
    execute = _execute_local if config.fail_fast or config.executor == "local" else _execute
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


def _check_lease(lease) -> None:
    """Stop writing once another run has taken this run's lease over (it missed renewals past the expiry)."""
    from pipeline.errors import OutputError
    from pipeline.output.lease import LeaseLost

    if lease is None:
        return
    try:
        lease.check()
    except LeaseLost as exc:
        raise OutputError(f"stopped: {exc}") from None


def _lake_step(config: RunConfig, out):
    if not config.iceberg.catalog:
        return None
    from pipeline.output.lake import append_runs

    return lambda: append_runs(config.iceberg, out)


def _execute_local(config: RunConfig, todo, longest_edge: int, skip_ids: frozenset[str]):
    """The same stages in a plain loop in this process: for debugging, and for --fail-fast, where a stage
    re-raises the first error instead of recording it."""
    from pipeline import errors

    errors.FAIL_FAST = config.fail_fast
    try:
        actor = _model_actor(config.model, config.extract, config.task)()
        render_args = _render_args(config, longest_edge, skip_ids)
        expand = expand_document if config.fail_fast else expand_document_isolated  # fail-fast: one traceback
        for ref in todo:
            batch = []
            for rec in expand(ref.source_uri, **render_args):
                batch.append(rec)
                if len(batch) == config.model.rows_per_call:
                    yield actor(to_table(batch, RENDERED_SCHEMA)).to_pylist()
                    batch = []
            if batch:
                yield actor(to_table(batch, RENDERED_SCHEMA)).to_pylist()
    finally:
        errors.FAIL_FAST = False


def _execute(config: RunConfig, todo, longest_edge: int, skip_ids: frozenset[str]):
    """The Ray Data plan for the documents still to do; yields result records as they stream in."""
    init_ray()  # first: it decides how Ray binds before Ray is imported
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = config.progress
    ctx.print_on_execution_start = config.progress
    # A compacted page is ~0.3 MB. Small blocks (~14 pages) stream out of rendering as they fill, and spread
    # over all model actors, which bundle them up to their batch size; Ray's default 128 MiB block would hold
    # ~450 pages and send a whole document to one actor.
    ctx.target_max_block_size = 4 * 2**20
    if not config.progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = ray.cluster_resources().get("CPU", 1)
    model_opts = config.model
    # Model start-up is expensive, so the pool has a fixed size rather than autoscaling.
    if gpus:
        actors = config.num_actors or gpus * config.actors_per_gpu
        actor_resources: dict[str, Any] = {"num_gpus": 1 / config.actors_per_gpu, "num_cpus": 1}
        render_cpus = 1.0
    else:
        # Without GPUs the model is the bottleneck and rendering needs a few percent of a core: the render
        # tasks get a small logical share and the actors the rest. One single-threaded actor per core avoids
        # torch's intra-op loss (on 2 cores, two threads ran the tiny model 1.7x as fast as one).
        # The shares are per core, not per cluster, so every node keeps room for a render task: sized from
        # the cluster total, actors filled each node of a multi-node cluster and rendering never started.
        actors = config.num_actors or max(1, int(cpus))
        render_cpus = 0.25
        actor_resources = {"num_cpus": max(0.25, min(1 - render_cpus, (cpus - render_cpus) / actors))}
        if model_opts.cpu_threads is None:
            model_opts = model_opts.model_copy(update={"cpu_threads": max(1, round(cpus / actors))})
    # Host memory for staging weights. Requesting it also makes the model stage's resources differ
    # from the render stage's, so Ray won't fuse rendering into the model's process: CPU rendering
    # must overlap the model's work, not queue behind it.
    actor_resources["memory"] = int(config.actor_memory_gb * 2**30)
    if not os.environ.get("RAY_ADDRESS"):
        # A local instance can't grow: an actor that fits no node would wait forever. (A cluster may be
        # about to add the node it needs, so there the request stands.)
        largest = max(n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"])
        if actor_resources["memory"] > largest:
            from pipeline.errors import ConfigError

            raise ConfigError(f"actor_memory_gb is {config.actor_memory_gb:g} but this machine's Ray offers "
                              f"{largest / 2**30:.1f} GiB: the model actors could never start (--actor-memory-gb)")

    ds = ray.data.from_items([{"source_uri": r.source_uri} for r in todo], override_num_blocks=min(len(todo), 1000))
    ds = ds.map_batches(
        _expand_documents,
        fn_kwargs=_render_args(config, longest_edge, skip_ids),
        concurrency=config.read_concurrency,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=render_cpus,
    )
    # generate: one call per actor at a time: a busy actor must not queue blocks that an idle one could take
    # (measured: with two in flight, one of two CPU actors sat idle). The continuous engine instead takes
    # calls_in_flight calls at once, each in its own thread, so new pages join the decode batch while earlier
    # ones finish: it never drains between blocks. Either way an actor holds at most that many blocks.
    # On a GPU the continuous engine sizes itself from memory (up to max_pages_in_flight): it gets calls enough to
    # fill that; an actor that fell back to generate runs them one at a time (see ModelActor).
    streams = model_opts.engine == "continuous" or (model_opts.engine == "auto" and gpus > 0)
    calls = model_opts.calls_in_flight if streams else 1
    if streams and gpus:
        from pipeline.model.sizing import DEFAULT_MAX_PAGES

        wanted = model_opts.max_pages_in_flight or DEFAULT_MAX_PAGES
        calls = min(16, max(calls, -(-wanted // model_opts.rows_per_call)))
    ds = ds.map_batches(
        _model_actor(model_opts, config.extract, config.task),
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=calls,
                                           max_concurrent_calls_per_actor=calls,
                                           enable_true_multi_threading=calls > 1),
        batch_size=config.model.rows_per_call,
        batch_format="pyarrow",
        **actor_resources,
    )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield batch.to_pylist()
    except Exception as exc:
        load_error = _model_load_error(exc)
        if load_error is None:
            raise
        raise load_error from None


def _model_load_error(exc: BaseException):
    """The ModelLoadError behind a model actor that died while loading, if that is what ended the run.

    Ray reports it as an ActorDiedError whose message carries the actor's traceback; the original
    exception object does not always travel, so its line is recovered from the text as a last resort.
    """
    import re

    from pipeline.errors import ModelLoadError

    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ModelLoadError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = re.search(r"ModelLoadError: ([^\n]+)", text)
    return ModelLoadError(m.group(1).strip()) if m else None


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """`docpipe finetune`: examples checked and rendered here, before any training; then the training loop in
    this process, or, with num_workers > 1, in Ray Train workers (data-parallel, DDP over NCCL or gloo)."""
    import json
    from pathlib import Path

    from pipeline.tools.finetune import RECORD, prepare_examples, train

    register_secrets(config.storage)
    prepared = prepare_examples(config)
    if prepared.skipped:
        print(f"docpipe: skipped {prepared.skipped} invalid example(s) (--skip-invalid)", file=sys.stderr)
    if config.num_workers == 1:
        return train(config, prepared)

    init_ray()
    import ray
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = ray.cluster_resources().get("CPU", 1)
    per_worker = {"CPU": 1} if gpus else {"CPU": max(0.5, min(1.0, cpus / config.num_workers))}
    if not gpus and config.model.cpu_threads is None:
        # One torch thread per core share: more only contend (as for the CPU model actors of a run).
        threads = max(1, int(cpus // config.num_workers))
        config = config.model_copy(update={"model": config.model.model_copy(update={"cpu_threads": threads})})
    output = Path(config.output).resolve()  # workers don't share the driver's working directory
    output.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(update={"output": str(output)})
    trainer = TorchTrainer(
        _finetune_worker,
        train_loop_config={"config": config, "prepared": prepared},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=bool(gpus),
                                     resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        # Ray Train's own run records; the adapter and docpipe's checkpoints go to the output itself.
        run_config=TrainRunConfig(name="docpipe-finetune", storage_path=str(output / "_ray_train")),
    )
    trainer.fit()
    return json.loads((output / RECORD).read_text())


def _finetune_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: torch.distributed is already set up; pipeline.tools.finetune.train does the rest."""
    from pipeline.tools.finetune import train

    train(loop_config["config"], loop_config["prepared"])
