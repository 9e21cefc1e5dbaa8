"""The work both executors run: the render stage's settings, and the model actor (model loaded once; OCR, then
extraction). The local loop (execute/local.py) calls them in this process, the Ray Data plan (execute/plan.py)
in tasks and actors; neither the stages nor this module know which.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

from docpipe.config import RunConfig
from docpipe.records import RESULT_SCHEMA, to_table
from docpipe.render.passwords import load_passwords


def render_args(config: RunConfig, longest_edge: int, skip_ids: frozenset[str]) -> dict[str, Any]:
    """expand_document's settings for this run, the same for both executors."""
    return {
        "opts": config.render,
        "longest_edge": longest_edge,
        "storage": config.storage,
        "ocr": "ocr" in config.task.split("+"),
        "chunk_pages": config.extract.page_cap if "extract" in config.task else None,
        "skip_ids": skip_ids,
        "route": config.route,
        "fail_fast": config.fail_fast,
        "pages": config.page_spans,
        "passwords": load_passwords(config),  # read here, on the driver: the files and the variable are its own
    }


def model_actor(model_opts, extract_opts, task: str, fail_fast: bool = False, schema=None):
    """Ray Data actor UDF around the model stages. The model loads once per actor, on the first call that has a
    page or chunk for it: a run whose pages all come from their text layer (or are blank) never loads it.

    The options are bound in the class rather than passed as constructor arguments, which
    Ray would park in the object store where an actor restart could lose them. ``schema``: the extraction schema
    the driver loaded (extract.schema.SchemaSpec); bound here, a user's own class travels with the actor.
    """

    class ModelActor:
        extraction_schema = schema  # the driver's SchemaSpec, pickled with the class

        def __init__(self):
            self.ocr = None  # the stages, once the model is loaded (_load)
            self.stages = []
            self.ready_at = None  # tells the driver when the model could start work
            self.actor = f"{socket.gethostname()}:{os.getpid()}"
            # With the continuous engine several calls run at once (threads): its OCR takes them all; a stage
            # that drives generate() takes one at a time.
            self.lock = threading.RLock()  # re-entered: a generate actor's call holds it around its stages
            self.load_lock = threading.Lock()  # calls in flight wait for the one loading the model
            self.calls = self.peak_calls = 0  # calls running at once: several with the continuous engine
            self.count_lock = threading.Lock()

        def _load(self) -> None:
            from docpipe.model.load import load_model
            from docpipe.ocr import OcrStage

            with self.load_lock:
                if self.ocr is not None:
                    return
                loaded = load_model(model_opts)
                # OCR passes chunk records through untouched; extraction passes page records through.
                ocr = OcrStage(model_opts, loaded=loaded, fail_fast=fail_fast)
                stages = [ocr]
                if "extract" in task:
                    from docpipe.extract.stage import ExtractStage

                    stages.append(ExtractStage(model_opts, extract_opts, loaded, fail_fast, spec=self.extraction_schema,
                                                ocr=ocr))
                self.stages, self.ready_at = stages, time.time()
                self.ocr = ocr  # last: the sign that the stages are ready

        def __call__(self, batch):
            _maybe_die()
            _maybe_hold()
            if self.ocr is None:
                if not _needs_model(batch):
                    return to_table(batch.to_pylist(), RESULT_SCHEMA)  # text-layer and blank pages, failures
                self._load()
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


def _needs_model(batch) -> bool:
    """Whether a block holds work for the model: a page that carries its image (the render stage drops it from a
    page it answered itself) or a chunk to extract from."""
    import pyarrow.compute as pc

    page = pc.and_(pc.equal(batch["kind"], "page"), pc.is_valid(batch["image"]))
    work = pc.and_(pc.equal(batch["status"], "ok"), pc.or_(page, pc.equal(batch["kind"], "chunk")))
    return bool(pc.any(work).as_py())


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
