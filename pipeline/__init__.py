"""docpipe: documents in object storage -> rendered pages -> Idefics2 OCR -> validated Parquet."""

__version__ = "0.1.0"
