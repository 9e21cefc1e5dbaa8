"""The Ray Data plan: inputs -> read and render (CPU tasks, lazily, page by page) -> model (a fixed-size actor
pool, sized by execute/resources.py) -> result records drained to the driver as they stream in.
"""

from __future__ import annotations

import logging
import os
import sys

from docpipe.config import RunConfig
from docpipe.execute import stages
from docpipe.execute.cluster import init_ray, ray_logs_to_file
from docpipe.execute.resources import check_actor_memory, run_resources
from docpipe.records import RENDERED_SCHEMA, to_table
from docpipe.render.isolated import expand_document_isolated
from docpipe.storage import register_secrets


def _expand_documents(batch, **render_args):
    """Ray Data UDF: document refs in, one-record tables out; a generator, so pages stream out lazily."""
    register_secrets(render_args["storage"])
    if render_args["passwords"] is not None:
        render_args["passwords"].register()
    for uri in batch.column("source_uri").to_pylist():
        for rec in expand_document_isolated(uri, **render_args):
            yield to_table([rec], RENDERED_SCHEMA)


def execute_ray(config: RunConfig, todo, longest_edge: int, skip_ids: frozenset[str], schema=None):
    """The Ray Data plan for the documents still to do; yields result records as they stream in. ``schema``: the
    extraction schema the driver loaded (extract.schema.SchemaSpec)."""
    bars = config.progress and sys.stderr.isatty()  # else docpipe prints its own progress (execute/run.py)
    with ray_logs_to_file(not bars) as log:
        yield from _execute(config, todo, longest_edge, skip_ids, schema, bars, log)


def _execute(config: RunConfig, todo, longest_edge: int, skip_ids: frozenset[str], schema, bars: bool, log):
    init_ray(quiet=not bars)  # first: it decides how Ray binds before Ray is imported
    if log:
        print(f"docpipe: Ray's own log lines go to {log}", file=sys.stderr, flush=True)
    import ray
    import ray.data

    ship_schema(schema)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bars
    ctx.print_on_execution_start = bars
    # A compacted page is ~0.3 MB. Small blocks (~14 pages) stream out of rendering as they fill, and spread
    # over all model actors, which bundle them up to their batch size; Ray's default 128 MiB block would hold
    # ~450 pages and send a whole document to one actor.
    ctx.target_max_block_size = 4 * 2**20
    if not bars:
        logging.getLogger("ray.data").setLevel(logging.WARNING)

    policy = run_resources(ray.cluster_resources(), config)
    model_opts = config.model
    if policy.cpu_threads != model_opts.cpu_threads:
        model_opts = model_opts.model_copy(update={"cpu_threads": policy.cpu_threads})
    if 0 < policy.actor_gpus < 1:  # actors sharing a GPU: each sizes its engine from its share of the memory
        model_opts = model_opts.model_copy(update={"gpu_memory_share": policy.actor_gpus})
    # Host memory for staging weights. Requesting it also makes the model stage's resources differ
    # from the render stage's, so Ray won't fuse rendering into the model's process: CPU rendering
    # must overlap the model's work, not queue behind it.
    actor_resources = {"num_cpus": policy.actor_cpus, "memory": policy.actor_memory}
    if policy.actor_gpus:
        actor_resources["num_gpus"] = policy.actor_gpus
    if not os.environ.get("RAY_ADDRESS"):  # a local instance can't grow
        check_actor_memory(config, max(n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]))

    ds = ray.data.from_items([{"source_uri": r.source_uri} for r in todo], override_num_blocks=min(len(todo), 1000))
    ds = ds.map_batches(
        _expand_documents,
        fn_kwargs=stages.render_args(config, longest_edge, skip_ids),
        concurrency=config.read_concurrency,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=policy.render_cpus,
    )
    calls = policy.calls_in_flight
    ds = ds.map_batches(
        stages.model_actor(model_opts, config.extract, config.task, schema=schema),
        compute=ray.data.ActorPoolStrategy(size=policy.actors, max_tasks_in_flight_per_actor=calls,
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


def ship_schema(schema) -> None:
    """A model from the working directory (extract.schema.SchemaSpec.local_module) goes to the actors by value,
    inside the pickled actor class: a worker, on another node or started elsewhere, may not have that folder."""
    if schema is not None and schema.local_module:
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[schema.local_module])


def _model_load_error(exc: BaseException):
    """The ModelLoadError behind a model actor that died while loading, if that is what ended the run.

    Ray reports it as an ActorDiedError whose message carries the actor's traceback; the original
    exception object does not always travel, so its line is recovered from the text as a last resort.
    """
    import re

    from docpipe.errors import ModelLoadError

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
