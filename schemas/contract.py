"""Rows docpipe writes, as pydantic models and as explicit Arrow schemas.

The two descriptions are kept side by side and a test checks that they agree, so a
column can't be added to one and forgotten in the other.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

# 2: schema_version and source_mtime columns; tables partitioned by ingest_date=YYYY-MM-DD/.
# 3: pages columns text_source (model, text_layer, blank) and renderer (pymupdf, pdfium, pillow).
# 4: pages column route_reason (why a page was answered without the model, or why the model read it); page text
#    is Markdown from both routes.
# 5: pages column blocks (the page's layout blocks in reading order: kind, Markdown, box); pages column
#    text_layer_analysis (fast or layout: how a text-layer page's structure was found); route reasons
#    broken_font_map, mojibake, presentation_forms, rtl_visual_order (text layers that cannot be read as text); page
#    status partial and error_type content_lost (part of a damaged page's content could not be loaded), documents
#    column repaired; no documents row for an input skipped unchanged at listing (the manifest counts them);
#    manifest fields status (finished, interrupted), errors (documents by error_type) and filtered (files
#    include/exclude left out).
CONTRACT_VERSION = 5


class PageStatus(str, Enum):
    ok = "ok"
    partial = "partial"  # read, but part of its content could not be loaded (error_type content_lost): text is what remained
    error = "error"


class DocumentStatus(str, Enum):
    ok = "ok"
    partial = "partial"  # opened, but at least one page failed or lost content
    error = "error"  # could not be opened, or no page succeeded
    skipped = "skipped"  # its bytes are already ok in this output under another URI (resume)


class TextSource(str, Enum):
    """Where a page's text came from."""

    model = "model"  # the vision-language model read the page image
    text_layer = "text_layer"  # the PDF's own text layer, judged trustworthy (render.text_layer auto)
    blank = "blank"  # the rendered page is blank: empty text, never sent to the model


class RouteReason(str, Enum):
    """Why the render stage answered a page itself, or sent it to the model (pipeline/render/route.py)."""

    trusted = "trusted"  # text_layer: the layer passed every rule
    blank = "blank"  # the rendered page is blank
    text_layer_never = "text_layer_never"  # --text-layer never: the model reads every page
    text_layer_error = "text_layer_error"  # the renderer failed reading the layer
    no_text_layer = "no_text_layer"  # image files
    unmapped_font = "unmapped_font"  # a font without a Unicode map: its text is glyph ids
    full_page_image = "full_page_image"  # a scan
    hidden_text = "hidden_text"  # white, transparent or invisible text
    bad_chars = "bad_chars"  # replacement, private-use or control characters
    broken_font_map = "broken_font_map"  # "(cid:NN)" placeholders, words mixing a right-to-left script with another
    mojibake = "mojibake"  # UTF-8 read as Latin-1 or cp1252 ("Ã©")
    presentation_forms = "presentation_forms"  # right-to-left text stored as shaped glyphs (presentation forms)
    rtl_visual_order = "rtl_visual_order"  # right-to-left words stored backwards (visual order)
    sparse = "sparse"  # too few visible characters for the page's area
    formulas = "formulas"  # math fonts or symbols: the model writes LaTeX


class TextLayerAnalysis(str, Enum):
    """How a text-layer page's structure was found (pipeline/render/text_layer.py)."""

    fast = "fast"  # the rules alone: plain prose, letters, one-column pages
    layout = "layout"  # with PyMuPDF's layout analysis: pages with tables, rulings, columns or graphics


class Renderer(str, Enum):
    """What turned the page into pixels (and, for text_layer pages, gave its text)."""

    pymupdf = "pymupdf"  # MuPDF, for PDFs
    pdfium = "pdfium"  # PDFium (pypdfium2), for PDFs MuPDF cannot open or render
    pillow = "pillow"  # image files and their frames


class BlockKind(str, Enum):
    """What a layout block is (pages.blocks). Furniture (page_header, page_footer, page_number) stays in the blocks
    but not in the page's text."""

    title = "title"
    heading = "heading"
    paragraph = "paragraph"
    list_item = "list_item"
    table = "table"
    caption = "caption"
    footnote = "footnote"
    formula = "formula"
    code = "code"
    picture = "picture"
    page_header = "page_header"
    page_footer = "page_footer"
    page_number = "page_number"
    other = "other"


FURNITURE = frozenset({BlockKind.page_header.value, BlockKind.page_footer.value, BlockKind.page_number.value})


class FinishReason(str, Enum):
    stop = "stop"  # the model ended its answer itself
    length = "length"  # cut off at max_new_tokens


class ErrorType(str, Enum):
    """Stable names for what went wrong; error_message carries the detail."""

    empty_file = "empty_file"
    unsupported_media_type = "unsupported_media_type"
    corrupt_document = "corrupt_document"
    encrypted_document = "encrypted_document"
    read_error = "read_error"
    empty_document = "empty_document"
    render_error = "render_error"
    image_decode_error = "image_decode_error"
    image_too_large = "image_too_large"  # a decompression bomb, or over the pixel cap
    timeout = "timeout"  # rendering took longer than the document or page limit
    renderer_crashed = "renderer_crashed"  # the rendering process died (e.g. a crash inside MuPDF)
    model_error = "model_error"
    all_pages_failed = "all_pages_failed"
    extraction_failed = "extraction_failed"
    content_lost = "content_lost"  # a damaged file MuPDF repaired: part of a page's content could not be loaded
    lost = "lost"  # the pipeline never reported back on it; recorded rather than dropped


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class Block(_Row):
    """One layout block of a page (an element of pages.blocks)."""

    kind: BlockKind
    text: str = Field(description="The block as Markdown, as it stands in the page's text (a heading with its #s, a "
                      "table as a Markdown or HTML table); furniture as its plain text.")
    x0: float = Field(ge=0, le=1, description="Left edge, as a fraction of the page's width (0 = left).")
    y0: float = Field(ge=0, le=1, description="Top edge, as a fraction of the page's height (0 = top).")
    x1: float = Field(ge=0, le=1, description="Right edge, as a fraction of the page's width.")
    y1: float = Field(ge=0, le=1, description="Bottom edge, as a fraction of the page's height.")


class PageRow(_Row):
    """One row of ``OUT/pages/*.parquet``: one rendered page and what the model read on it."""

    doc_id: str = Field(description="Hex SHA-256 of the document's bytes.")
    source_uri: str = Field(description="Where the document was read from.")
    page_number: int = Field(ge=1, description="1-based page (or image frame) number.")
    page_count: int = Field(ge=1, description="Pages in the document.")
    width: int | None = Field(None, description="Rendered width in pixels; null if rendering failed.")
    height: int | None = Field(None, description="Rendered height in pixels; null if rendering failed.")
    status: PageStatus
    text: str | None = Field(None, description="The page as Markdown (the model's, or the text layer's); null on "
                             "error.")
    error_type: ErrorType | None = None
    error_message: str | None = None
    model: str | None = Field(None, description="Model id or path that produced the text.")
    output_tokens: int | None = Field(None, ge=0, description="Tokens generated for this page.")
    finish_reason: FinishReason | None = None
    text_source: TextSource | None = Field(None, description="Where the text came from; null on error.")
    renderer: Renderer | None = Field(None, description="What rendered the page; null if it was not rendered.")
    route_reason: RouteReason | None = Field(
        None, description="Why the page was answered without the model or sent to it; null on a render error, in "
        "extract-only runs and in outputs older than contract v4."
    )
    blocks: list[Block] | None = Field(
        None, description="The page's layout blocks in reading order (kind, Markdown, box as fractions of the page, "
        "origin top left), furniture included; null on model pages whose model gives no boxes, on errors and in "
        "outputs older than contract v5."
    )
    text_layer_analysis: TextLayerAnalysis | None = Field(
        None, description="On text-layer pages, how the page's structure was found: 'fast' (the rules alone) or "
        "'layout' (PyMuPDF's layout analysis too, on pages with tables, rulings, columns or graphics); null on other "
        "pages and in outputs older than contract v5."
    )
    run_id: str
    schema_version: int = Field(CONTRACT_VERSION, description="Version of this table's layout (the contract).")


class DocumentRow(_Row):
    """One row of ``OUT/documents/*.parquet``: exactly one per input document per run."""

    doc_id: str | None = Field(None, description="Hex SHA-256 of the bytes; null only if they could not be read.")
    source_uri: str
    size_bytes: int | None = Field(None, ge=0)
    source_mtime: datetime | None = Field(
        None, description="The source's modification time when listed; with size_bytes, how incremental runs "
        "tell a changed document from a seen one."
    )
    media_type: str | None = Field(None, description="Sniffed from the bytes, e.g. application/pdf, image/png.")
    page_count: int | None = Field(None, ge=0, description="Pages found; null if the document could not be opened.")
    repaired: bool | None = Field(
        None, description="A PDF MuPDF had to repair on opening (a damaged or truncated file: its cross-reference "
        "table rebuilt): true; its pages' statuses say whether content was lost (partial, content_lost). Null for "
        "images, unopened documents and outputs older than contract v5."
    )
    status: DocumentStatus
    error_type: ErrorType | None = None
    error_message: str | None = None
    run_id: str
    extraction: str | None = Field(None, description="Extracted JSON object (task extract); null otherwise.")
    schema_name: str | None = Field(None, description="Schema the extraction follows.")
    schema_hash: str | None = Field(None, description="First 16 hex digits of the SHA-256 of the canonical JSON Schema.")
    valid: bool | None = Field(None, description="Whether the extraction validated against the schema.")
    validation_errors: list[str] | None = Field(None, description="Why it did not: 'path: message' per error.")
    raw_output: str | None = Field(None, description="The model's text, kept for audit.")
    extraction_finish_reason: str | None = Field(
        None, description="stop, length (cut at max_new_tokens) or repetition (run-away loop stopped)."
    )
    extraction_attempts: int | None = Field(None, ge=0, description="Generations run: 2 when a retry was needed.")
    schema_version: int = Field(CONTRACT_VERSION, description="Version of this table's layout (the contract).")


class RunManifest(BaseModel):
    """``OUT/_runs/<run_id>.json``, written last: its presence marks a finished run."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    contract_version: int = CONTRACT_VERSION
    docpipe_version: str
    status: str = Field(
        "finished", description="finished; or interrupted (SIGINT, SIGTERM): the documents finished by then were "
        "sealed and counted here, the rest has no row and is done by the next run."
    )
    started_at: str
    finished_at: str
    config: dict[str, Any]
    documents: dict[str, int] = Field(
        description="Document rows this run wrote, by status, plus 'total'. Inputs skipped unchanged at listing get "
        "no row: counters skipped_unchanged_listing (ok before) and skipped_failed_unchanged (failed for good before)."
    )
    errors: dict[str, int] = Field(
        default_factory=dict, description="Document rows with status error or partial, by error_type."
    )
    filtered: list[str] = Field(
        default_factory=list, description="Listed files the include/exclude globs left out (the first 100; counter "
        "listing_filtered_out counts them all)."
    )
    pages: dict[str, int] = Field(description="Page counts by status, plus 'total'.")
    timings: dict[str, float] = Field(
        description="wall_s; pages_per_s over the whole run; model_ready_s: seconds until the first model "
        "actor had loaded its model."
    )
    counters: dict[str, int] = Field(
        default_factory=dict, description="Other counts, e.g. model_retries: pages re-run after their batch failed; "
        "pages_model, pages_text_layer, pages_blank: ok pages by text_source; documents_opened_pdfium: PDFs MuPDF gave up on that PDFium opened; pages_rendered_pdfium: pages PDFium "
        "rendered (those documents' pages, and pages MuPDF failed on)."
    )
    files: dict[str, list[str]] = Field(description="Parquet files this run wrote, relative to OUT.")
    engines: list[dict[str, Any]] = Field(
        default_factory=list, description="Per model actor: the engine it ran ('generate' or 'continuous'), the "
        "engine requested, why (e.g. 'auto on cpu', or 'fallback: ...' when the continuous engine could not start), "
        "peak_calls_in_flight, the most blocks it worked on at once, and peak_pages_in_flight, the most pages its "
        "continuous engine held at once.",
    )
    iceberg: dict[str, dict[str, int]] | None = Field(
        None, description="With an Iceberg catalog configured: per table, the runs appended by this run (its own, "
        "and any an earlier run left out) and their snapshot ids."
    )


# pages.blocks' element: four plain float fields for the box rather than a fixed-size list, which every reader
# (DuckDB, Spark, Iceberg) takes.
BLOCK_TYPE = pa.struct([
    pa.field("kind", pa.string(), nullable=False),
    pa.field("text", pa.large_string(), nullable=False),
    pa.field("x0", pa.float32(), nullable=False),
    pa.field("y0", pa.float32(), nullable=False),
    pa.field("x1", pa.float32(), nullable=False),
    pa.field("y1", pa.float32(), nullable=False),
])

PAGES_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("page_number", pa.int32(), nullable=False),
        pa.field("page_count", pa.int32(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("text", pa.large_string()),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("model", pa.string()),
        pa.field("output_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("text_source", pa.string()),
        pa.field("renderer", pa.string()),
        pa.field("route_reason", pa.string()),
        pa.field("blocks", pa.list_(BLOCK_TYPE)),
        pa.field("text_layer_analysis", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("schema_version", pa.int16(), nullable=False),
    ],
    metadata={"docpipe.contract_version": str(CONTRACT_VERSION), "docpipe.table": "pages"},
)

# The per-document extraction result: produced by the extraction stage, written to documents rows as is.
EXTRACTION_COLUMNS = (
    "extraction", "valid", "validation_errors", "raw_output", "extraction_finish_reason", "extraction_attempts",
)

DOCUMENTS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64()),
        pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
        pa.field("media_type", pa.string()),
        pa.field("page_count", pa.int32()),
        pa.field("repaired", pa.bool_()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("extraction", pa.large_string()),
        pa.field("schema_name", pa.string()),
        pa.field("schema_hash", pa.string()),
        pa.field("valid", pa.bool_()),
        pa.field("validation_errors", pa.list_(pa.string())),
        pa.field("raw_output", pa.large_string()),
        pa.field("extraction_finish_reason", pa.string()),
        pa.field("extraction_attempts", pa.int32()),
        pa.field("schema_version", pa.int16(), nullable=False),
    ],
    metadata={"docpipe.contract_version": str(CONTRACT_VERSION), "docpipe.table": "documents"},
)
