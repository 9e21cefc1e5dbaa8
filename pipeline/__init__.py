"""docpipe: documents in object storage -> rendered pages -> Idefics2 OCR -> validated Parquet.

The Python API (docs/python.md), loaded on first use so that ``import docpipe.schemas`` stays free of torch and Ray:

- ``docpipe.run(config) -> RunResult``: a job, as ``docpipe run`` runs it (``config``: a RunConfig or a dict);
  ``docpipe.dry_run(config)``: what it would do.
- ``docpipe.convert(path_or_bytes, model=..., task=...) -> Converted`` (``.markdown``, ``.extraction``, rows), and
  ``docpipe.Converter`` to keep the model loaded across documents.
- ``docpipe.build_processor(config)``: docpipe's render, route, OCR and extract steps on a Ray Dataset of your own.
- ``docpipe.export_markdown(OUT, DIR)``: a Markdown file per document of an output.
"""

__version__ = "0.1.0"

# name -> the module that defines it; imported when the name is first asked for (PEP 562)
_LAZY = {
    "run": "docpipe.api",
    "dry_run": "docpipe.api",
    "convert": "docpipe.api",
    "Converter": "docpipe.api",
    "Converted": "docpipe.api",
    "export_markdown": "docpipe.api",
    "DryRun": "docpipe.api",
    "RunResult": "docpipe.api",
    "RunConfig": "docpipe.config",
    "build_processor": "docpipe.execute.processor",
    "ProcessorConfig": "docpipe.execute.processor",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'docpipe' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once: later lookups don't come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
