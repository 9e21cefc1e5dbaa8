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
    }


def model_actor(model_opts, extract_opts, task: str, fail_fast: bool = False):
    """Ray Data actor UDF around the model stages; the model loads once per actor, in __init__.

    The options are bound in the class rather than passed as constructor arguments, which
    Ray would park in the object store where an actor restart could lose them.
    """

    class ModelActor:
        def __init__(self):
            from docpipe.model.load import load_model
            from docpipe.ocr import OcrStage

            loaded = load_model(model_opts)
            # OCR passes chunk records through untouched; extraction passes page records through.
            self.ocr = OcrStage(model_opts, loaded=loaded, fail_fast=fail_fast)
            self.stages = [self.ocr]
            if "extract" in task:
                from docpipe.extract.stage import ExtractStage

                self.stages.append(ExtractStage(model_opts, extract_opts, loaded, fail_fast, ocr=self.ocr))
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
