"""The in-process executor (``executor: local``, and --fail-fast): the same stages as the Ray Data plan, in a
plain loop in this process, without Ray. For debugging, and for --fail-fast, where a stage re-raises the first
error instead of recording it.
"""

from __future__ import annotations

from docpipe.config import RunConfig
from docpipe.execute import stages
from docpipe.records import RENDERED_SCHEMA, to_table
from docpipe.render.document import expand_document
from docpipe.render.isolated import expand_document_isolated


def execute_local(config: RunConfig, todo, longest_edge: int, skip_ids: frozenset[str], actor=None,
                  data: dict[str, bytes] | None = None, schema=None):
    """Result records for the documents still to do, a model call's worth at a time. ``actor``: a model actor
    (stages.model_actor's, made) to reuse, as the Python API's Converter does across calls; ``data``: documents'
    bytes by URI, for those the caller holds (bytes given to docpipe.convert, stdin); ``schema``: the extraction
    schema the driver loaded."""
    actor = actor or stages.model_actor(config.model, config.extract, config.task, config.fail_fast, schema)()
    render_args = stages.render_args(config, longest_edge, skip_ids)
    expand = expand_document if config.fail_fast else expand_document_isolated  # fail-fast: one traceback
    for ref in todo:
        batch = []
        held = {"data": data[ref.source_uri]} if data and ref.source_uri in data else {}
        for rec in expand(ref.source_uri, **render_args, **held):
            batch.append(rec)
            if len(batch) == config.model.rows_per_call:
                yield actor(to_table(batch, RENDERED_SCHEMA)).to_pylist()
                batch = []
        if batch:
            yield actor(to_table(batch, RENDERED_SCHEMA)).to_pylist()
