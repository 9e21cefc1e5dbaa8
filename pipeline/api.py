"""docpipe from Python (docs/python.md): run a job (``run``, ``dry_run``), convert documents in this process
(``convert``, ``Converter``), and write Markdown files from an output (``export_markdown``). For a Ray Dataset of
your own, see ``docpipe.build_processor`` (pipeline/execute/processor.py).

Everything here is what the ``docpipe`` command does: the same configuration (``RunConfig``, or a dict of its
options), routing, models and output contract.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from docpipe.config import RunConfig
from docpipe.execute.preview import DryRun
from docpipe.execute.run import RunResult
from docpipe.output.markdown import Exported, document_markdown
from docpipe.schemas import PAGES_SCHEMA

__all__ = ["Converted", "Converter", "DryRun", "Exported", "RunResult", "convert", "dry_run", "export_markdown",
           "run"]

# RunConfig needs an output; conversion in this process writes none.
_NO_OUTPUT = "(none: converted in this process)"


def _run_config(config: RunConfig | dict[str, Any] | None) -> RunConfig:
    """``config``: a RunConfig, or a dict of its options as a job file has them."""
    return config if isinstance(config, RunConfig) else RunConfig.model_validate(config or {})


def run(config: RunConfig | dict[str, Any]) -> RunResult:
    """Run a job, as ``docpipe run`` does: the documents in ``config.inputs`` into ``config.output``. Returns the
    RunResult: its manifest, and its rows (``result.documents()``, ``result.pages()``)."""
    from docpipe.execute.run import run as run_job

    return run_job(_run_config(config))


def dry_run(config: RunConfig | dict[str, Any]) -> DryRun:
    """What ``run(config)`` would process, filter out and skip, and why; nothing is read or written."""
    from docpipe.execute.preview import dry_run as preview

    return preview(_run_config(config))


def export_markdown(output: str, dest: str, storage=None) -> Exported:
    """One Markdown file per document of an output (its latest result) under ``dest``: ``docpipe export``."""
    from docpipe.output.markdown import export_markdown as export

    return export(output, dest, storage)


@dataclass
class Converted:
    """One document converted in this process: its documents row and pages rows (the output contract's columns,
    as ``docpipe run`` writes them), and what they make."""

    document: dict[str, Any]
    pages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def source_uri(self) -> str:
        return self.document["source_uri"]

    @property
    def status(self) -> str:
        """ok, partial (some pages failed) or error."""
        return self.document["status"]

    @property
    def markdown(self) -> str:
        """The pages' text in order, each page opened by ``<!-- page N -->``; failed pages and documents marked
        (pipeline/output/markdown.py)."""
        return document_markdown(self.document, self.pages)

    @property
    def extraction(self) -> Any:
        """The extracted JSON object (task extract or ocr+extract), parsed; None otherwise."""
        text = self.document.get("extraction")
        return json.loads(text) if text else None

    @property
    def ok(self) -> bool:
        """Every page read, and an extraction, if any, valid for its schema."""
        return self.status == "ok" and self.document.get("valid") is not False

    @property
    def problem(self) -> str | None:
        """One line saying what went wrong, or None."""
        doc = self.document
        if doc["status"] != "ok":
            return f"{doc['status']} {doc['error_type']}: {doc['error_message']}"
        if doc.get("valid") is False:
            errors = "; ".join(doc.get("validation_errors") or [])
            return f"extraction not valid for schema {doc.get('schema_name')}: {errors}"
        return None

    def as_json(self) -> dict[str, Any]:
        """The document as one JSON object: status, errors, and its extraction and Markdown where the task made
        them (``docpipe convert --json``)."""
        doc = self.document
        out = {k: doc.get(k) for k in ("source_uri", "doc_id", "status", "error_type", "error_message", "page_count")}
        if doc.get("schema_name"):
            out.update(schema=doc["schema_name"], valid=doc.get("valid"),
                       validation_errors=doc.get("validation_errors") or [], extraction=self.extraction)
        if any(p.get("text") is not None for p in self.pages) or not doc.get("schema_name"):
            out["markdown"] = self.markdown
        return out


class Converter:
    """Documents to Markdown (or extracted JSON) in this process, with the model loaded once for every call:
    ``docpipe convert`` and ``docpipe.convert`` use it. No output folder, no Ray: the local executor's stages
    (render in a child process under the time limits, route, OCR, extract) and the run's accounting (one documents
    row per document, one pages row per page).

    ``config``: a RunConfig or a dict of its options (``output`` is not needed); the keywords are shortcuts:
    ``model`` (a name), ``task``, ``schema``, ``pages``, ``password``.
    """

    def __init__(self, config: RunConfig | dict[str, Any] | None = None, *, model: str | None = None,
                 task: str | None = None, schema: str | None = None, pages: str | None = None,
                 password: str | None = None):
        base = config.model_dump(by_alias=True) if isinstance(config, RunConfig) else dict(config or {})
        if model is not None:
            base["model"] = {**(base.get("model") or {}), "name": model}
        if schema is not None:
            base["extract"] = {**(base.get("extract") or {}), "schema": schema}
        shortcuts = {"task": task, "pages": pages, "password": password}
        base.update({k: v for k, v in shortcuts.items() if v is not None})
        base.setdefault("output", _NO_OUTPUT)
        base["executor"] = "local"
        self.config = RunConfig.model_validate(base)
        self._actor = self._schema = self._edge = None
        self._ready = False

    def _prepare(self) -> None:
        """The run's checks (schema, passwords), the render size and the model: once, at the first document."""
        if self._ready:
            return
        from docpipe.execute import stages
        from docpipe.execute.run import _check_documents_options, _check_schema
        from docpipe.model.load import render_edge_for, resolve_checkpoint
        from docpipe.storage import register_secrets

        config = self.config
        register_secrets(config.storage)
        self._schema = _check_schema(config)
        _check_documents_options(config)
        self._edge = config.render.longest_edge or render_edge_for(resolve_checkpoint(config.model.name),
                                                                   config.model)
        self._actor = stages.model_actor(config.model, config.extract, config.task, config.fail_fast, self._schema)()
        self._ready = True

    def convert(self, source: str | os.PathLike | bytes, *, name: str | None = None) -> Converted:
        """One document: a path or URI of one file, or its bytes (``name``: the source_uri its rows get)."""
        results = list(self.convert_all([source], names=[name] if name else None, single=True))
        return results[0]

    def convert_all(self, sources: Iterable[str | os.PathLike | bytes], *, names: list[str] | None = None,
                    single: bool = False) -> Iterator[Converted]:
        """Documents as each is done, in listing order: files, folders (searched recursively), globs and URIs,
        as ``docpipe run`` lists them (include/exclude from the config apply), or bytes."""
        from docpipe.errors import InputError
        from docpipe.execute.local import execute_local
        from docpipe.execute.run import new_run_id
        from docpipe.output.ledger import DocumentLedger
        from docpipe.sources import DocumentRef, list_inputs

        config = self.config
        sources = list(sources)
        names = names or [None] * len(sources)
        refs, data, paths = [], {}, []
        for source, name in zip(sources, names):
            if isinstance(source, (bytes, bytearray, memoryview)):
                uri = name or "bytes:" + hashlib.sha256(source).hexdigest()[:16]
                data[uri] = bytes(source)
                refs.append(DocumentRef(uri, len(source)))
            else:
                paths.append(os.fspath(source))
        if paths:
            listing = list_inputs(paths, (), config.include, config.exclude, config.storage)
            refs += listing.refs
        if not refs:
            raise InputError("no documents to convert in: " + " ".join(paths))
        if single and len(refs) > 1:
            raise InputError(f"{paths[0]} holds {len(refs)} documents: convert_all takes several")
        if len({r.source_uri for r in refs}) < len(refs):
            raise InputError("two documents have one name: give each its own (names=...)")
        self._prepare()
        ledger = DocumentLedger(refs, new_run_id(), self._schema, config.page_spans)
        for records in execute_local(config, refs, self._edge, frozenset(), self._actor, data):
            for rec in records:
                done = ledger.add(rec)
                if done:
                    yield _converted(*done, ledger.run_id)
        for done in ledger.finish_all():
            yield _converted(*done, ledger.run_id)


def _converted(doc: dict[str, Any], pages: list[dict[str, Any]], run_id: str) -> Converted:
    from docpipe.schemas import CONTRACT_VERSION

    stamp = {"run_id": run_id, "schema_version": CONTRACT_VERSION}
    rows = [{name: rec.get(name) for name in PAGES_SCHEMA.names} | stamp for rec in pages]
    return Converted(doc | {"schema_version": CONTRACT_VERSION}, sorted(rows, key=lambda r: r["page_number"]))


def convert(source: str | os.PathLike | bytes, *, name: str | None = None,
            config: RunConfig | dict[str, Any] | None = None, **shortcuts: Any) -> Converted:
    """One document converted in this process (a path, URI or bytes): ``docpipe.convert("a.pdf").markdown``.
    Loads the model for this call alone; a ``Converter`` keeps it for many. ``shortcuts``: Converter's keywords
    (model, task, schema, pages, password)."""
    return Converter(config, **shortcuts).convert(source, name=name)

