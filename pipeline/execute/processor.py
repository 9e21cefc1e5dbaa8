"""docpipe's stages on a Ray Dataset of your own, in the style of ``ray.data.llm``: build a processor from a config,
then ``ds = processor(ds)``; or take its steps and put them in your own plan (docs/python.md#a-ray-dataset-pipeline).

    config = ProcessorConfig(model={"name": "HuggingFaceM4/idefics2-8b"}, task="ocr", concurrency=4, num_gpus=1)
    processor = build_processor(config)
    ds = ray.data.read_binary_files("s3://bucket/scans/", include_paths=True)   # columns: bytes, path
    ds = processor(ds)                                                           # one row per document, page, chunk
    pages = ds.filter(lambda row: row["kind"] == "page")

The steps, each ``map_batches``-ready (``processor.map_batches_args(step)`` gives the arguments the processor uses):

- ``processor.render``: documents in (a ``source_uri`` or ``path`` column, and ``bytes`` when the bytes are already
  read; otherwise they are read from the URI), records out: one ``document`` record per input, one ``page``
  record per page (of ``pages``, if set), and, for extraction, one ``chunk`` record per page_cap pages. Routing
  happens here, since it needs the PDF itself: a page whose text layer is trusted, or that is blank, already
  carries its text (text_source text_layer or blank) and goes to no model. Failures are records with an
  error_type, never exceptions. Tasks (CPU); rendering runs in a child process under the time limits.
- ``processor.model``: the model actor class: OCR of the pages still without text, then extraction of the chunks
  (by ``task``), with the model loaded once per actor. Use it with ``compute=ray.data.ActorPoolStrategy``.
- ``processor.records``: drops the actor's bookkeeping columns: what is left is ``docpipe.records.RESULT_SCHEMA``
  less ``actor_ready_at`` and ``actor_engine``, the pages' columns as the output contract has them, a ``kind``
  column saying which record a row is.

Unlike ``docpipe run``, nothing here writes an output, accounts per document (the ledger) or resumes: the rows are
yours to write (``ds.write_parquet``), and a document's status is its ``document`` record's, with its pages'.
Only this package (pipeline/execute/) imports Ray; the steps themselves are plain callables.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import Field, SecretStr

from docpipe.config import ExtractOptions, ModelOptions, RenderOptions, RouteOptions, StorageOptions, _Options, \
    parse_pages
from docpipe.execute import stages
from docpipe.records import RENDERED_SCHEMA, to_table
from docpipe.render.isolated import expand_document_isolated
from docpipe.storage import register_secrets

ACTOR_COLUMNS = ("actor_ready_at", "actor_engine")


class ProcessorConfig(_Options):
    """What ``build_processor`` builds: docpipe's options for the stages, and the model actors' resources."""

    task: Literal["ocr", "extract", "ocr+extract"] = Field(
        "ocr", description="ocr: text per page; extract: JSON per chunk of page_cap pages; ocr+extract: both."
    )
    model: ModelOptions = Field(default_factory=ModelOptions)
    render: RenderOptions = Field(default_factory=RenderOptions)
    route: RouteOptions = Field(default_factory=RouteOptions)
    extract: ExtractOptions = Field(default_factory=ExtractOptions)
    storage: StorageOptions = Field(default_factory=StorageOptions, description="For inputs read from their URI.")
    pages: str | None = Field(None, description="Only these pages of each document, e.g. '1-5,8' (RunConfig.pages).")
    password: SecretStr | None = Field(None, description="Password tried on encrypted PDFs (RunConfig.password).")
    concurrency: int = Field(1, ge=1, description="Model actors (a fixed-size pool: loading a model is costly).")
    num_gpus: float = Field(0, ge=0, description="GPUs per model actor: 1 on a GPU cluster, 0 on CPUs.")
    num_cpus: float = Field(1, gt=0, description="CPUs per model actor.")
    actor_memory_gb: float = Field(
        4.0, gt=0, description="Host memory (GiB) reserved for each model actor (RunConfig.actor_memory_gb). Asking "
        "for it also keeps Ray from fusing rendering into the model actors' processes, where it would queue "
        "behind the model instead of overlapping it.",
    )
    render_num_cpus: float = Field(1, gt=0, description="CPUs per render task.")

    def _page_spans(self):
        return parse_pages(self.pages) if self.pages else None


class RenderStep:
    """The render-and-route step: a ``map_batches`` UDF (batch_format pyarrow; a generator, so pages stream out
    one record at a time and a 2,000-page PDF is never held whole)."""

    def __init__(self, config: ProcessorConfig, longest_edge: int):
        from docpipe.render.passwords import Passwords

        self.storage = config.storage
        self.passwords = Passwords(config.password) if config.password else None
        self.args = {"opts": config.render, "longest_edge": longest_edge, "storage": config.storage,
                     "ocr": "ocr" in config.task.split("+"), "route": config.route,
                     "chunk_pages": config.extract.page_cap if "extract" in config.task else None,
                     "pages": config._page_spans(), "passwords": self.passwords}

    def __call__(self, batch):
        register_secrets(self.storage)  # in this worker: kept out of the records' error messages
        if self.passwords is not None:
            self.passwords.register()
        names = batch.column_names
        uris = batch.column("source_uri" if "source_uri" in names else "path").to_pylist()
        data = batch.column("bytes").to_pylist() if "bytes" in names else [None] * len(uris)
        for uri, content in zip(uris, data):
            held = {"data": content} if content is not None else {}
            for rec in expand_document_isolated(uri, **self.args, **held):
                yield to_table([rec], RENDERED_SCHEMA)


def records(batch):
    """The model step's output less the actor's bookkeeping columns (a ``map_batches`` UDF, batch_format
    pyarrow)."""
    return batch.drop_columns([c for c in ACTOR_COLUMNS if c in batch.column_names])


class Processor:
    """preprocess -> render (and route) -> model (OCR, extraction) -> records -> postprocess, on a Ray Dataset."""

    def __init__(self, config: ProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                 postprocess: Callable[[dict], dict] | None = None):
        from docpipe.model.load import render_edge_for, resolve_checkpoint

        if "extract" in config.task and not config.extract.schema_spec:
            from docpipe.errors import ConfigError

            raise ConfigError(f"task {config.task} needs a schema (extract.schema)")
        self.config, self.preprocess, self.postprocess = config, preprocess, postprocess
        edge = config.render.longest_edge or render_edge_for(resolve_checkpoint(config.model.name), config.model)
        self.render = RenderStep(config, edge)
        self.model = stages.model_actor(config.model, config.extract, config.task)
        self.records = records

    def map_batches_args(self, step) -> dict[str, Any]:
        """The arguments ``map_batches`` takes ``step`` (render, model or records) with, as this processor uses it."""
        import ray.data

        if step is self.render:
            return {"batch_size": 1, "batch_format": "pyarrow", "num_cpus": self.config.render_num_cpus}
        if step is self.model:
            gpus = {"num_gpus": self.config.num_gpus} if self.config.num_gpus else {}
            return {"compute": ray.data.ActorPoolStrategy(size=self.config.concurrency),
                    "batch_size": self.config.model.rows_per_call, "batch_format": "pyarrow",
                    "num_cpus": self.config.num_cpus, "memory": self.config.actor_memory_gb * 2**30, **gpus}
        if step is self.records:
            return {"batch_format": "pyarrow"}
        raise ValueError(f"not a step of this processor: {step!r}")

    def __call__(self, ds):
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        for step in (self.render, self.model, self.records):
            ds = ds.map_batches(step, **self.map_batches_args(step))
        if self.postprocess is not None:
            ds = ds.map(self.postprocess)
        return ds


def build_processor(config: ProcessorConfig | dict[str, Any], preprocess: Callable[[dict], dict] | None = None,
                    postprocess: Callable[[dict], dict] | None = None) -> Processor:
    """A Processor for ``config`` (a ProcessorConfig or a dict of its options); ``preprocess`` and
    ``postprocess``: row functions applied before rendering and after the model (``ds.map``)."""
    if not isinstance(config, ProcessorConfig):
        config = ProcessorConfig.model_validate(config)
    return Processor(config, preprocess, postprocess)
