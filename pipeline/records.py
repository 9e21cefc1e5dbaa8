"""The records that flow between stages inside a run.

A run's stream carries two kinds of record: one ``document`` record per input (what was
found when it was opened) and one ``page`` record per page. Both kinds share one Arrow
schema so Ray blocks never disagree on column types.
"""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa

from docpipe.schemas import BLOCK_TYPE, DOCUMENTS_SCHEMA, EXTRACTION_COLUMNS

DOCUMENT = "document"
PAGE = "page"
CHUNK = "chunk"  # up to page_cap pages of one document, for extraction

RENDERED_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("source_uri", pa.string()),
        ("doc_id", pa.string()),
        ("size_bytes", pa.int64()),
        ("media_type", pa.string()),
        ("page_number", pa.int32()),
        ("page_count", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),  # encoded page image; null on error
        ("image_codec", pa.string()),  # render.RAW_CODEC, "png" or "jpeg"
        ("renderer", pa.string()),  # docpipe.schemas.Renderer: what rendered the page
        ("text_source", pa.string()),  # docpipe.schemas.TextSource, once decided (the model stage sets "model")
        ("text", pa.large_string()),  # set by the render stage for text_layer and blank pages, else by the model
        ("route_reason", pa.string()),  # docpipe.schemas.RouteReason: why the render stage answered the page, or did not
        ("blocks", pa.list_(BLOCK_TYPE)),  # the page's layout blocks (pages.blocks), from the text layer or the model
        ("text_layer_analysis", pa.string()),  # docpipe.schemas.TextLayerAnalysis: how a text-layer page was read
        ("status", pa.string()),
        ("repaired", pa.bool_()),  # document records: MuPDF repaired the file on opening
        ("damage", pa.string()),  # page records: MuPDF's warnings on content it could not load (the ledger's partial)
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        # chunk records (extraction) carry several pages; document records say how many chunks follow
        ("chunk_index", pa.int32()),
        ("chunk_count", pa.int32()),
        ("images", pa.list_(pa.binary())),
        ("image_codecs", pa.list_(pa.string())),
        ("widths", pa.list_(pa.int32())),
        ("heights", pa.list_(pa.int32())),
    ]
)

# What the model stage returns: the page image is dropped, the model's answer added.
RESULT_SCHEMA = pa.schema(
    [f for f in RENDERED_SCHEMA if f.name not in ("image", "image_codec", "images", "image_codecs", "widths", "heights")]
    + [
        pa.field("model", pa.string()),
        pa.field("output_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("retries", pa.int32()),  # times this page's batch was split after a model failure
        pa.field("actor_ready_at", pa.float64()),  # epoch seconds the model actor finished loading
        pa.field("actor_engine", pa.string()),  # JSON: the engine this actor runs and why (for the manifest)
    ]
    + [DOCUMENTS_SCHEMA.field(name) for name in EXTRACTION_COLUMNS]  # a chunk's result, as documents rows keep it
)


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly ``schema``'s columns; keys a row lacks are null."""
    rows = list(rows)
    return pa.Table.from_pydict({name: [r.get(name) for r in rows] for name in schema.names}, schema=schema)
