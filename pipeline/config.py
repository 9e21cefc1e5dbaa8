"""The run configuration: one typed, documented object handed to every stage."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, field_validator

DEFAULT_MODEL = "HuggingFaceM4/idefics2-8b"
TINY_MODEL = "tiny-random"

# Both routes write a page in one format (pipeline/render/text_layer.py writes a trusted text layer this way), so a reader
# cannot tell from the text which route wrote it; text_source says. finetune trains on this same prompt.
OCR_PROMPT = (
    "Transcribe this page as Markdown, in reading order: # headings, Markdown tables (an HTML table where cells "
    "span), LaTeX formulas in \\( \\) or \\[ \\]. Skip running heads and page numbers. Return only the transcription."
)


def parse_pages(text: str) -> tuple[tuple[int, int | None], ...]:
    """A page selection such as "1-5,8" or "3-" (from page 3 to the end) as (first, last or None) spans; 1-based,
    as pages.page_number. ValueError, with what is wrong, for anything else."""
    spans = []
    for item in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:(-)(\d*))?", item)
        if not m:
            raise ValueError(f"page selection {text!r}: {item!r} is not N, N-M or N- (e.g. 1-5,8)")
        first = int(m[1])
        last = None if m[2] and not m[3] else int(m[3] or m[1])
        if first < 1 or (last is not None and last < first):
            raise ValueError(f"page selection {text!r}: {item!r} must count from 1, first page first")
        spans.append((first, last))
    return tuple(spans)


def selected_pages(spans: tuple[tuple[int, int | None], ...] | None, page_count: int) -> list[int]:
    """The page numbers of a document of ``page_count`` pages that ``spans`` (parse_pages) select, in order; all of
    them without a selection."""
    if spans is None:
        return list(range(1, page_count + 1))
    return [n for n in range(1, page_count + 1) if any(a <= n and (b is None or n <= b) for a, b in spans)]


class _Options(BaseModel):
    # Unknown keys are errors: a misspelt option must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelOptions(_Options):
    name: str = Field(
        DEFAULT_MODEL,
        description="A preset (idefics2-8b, idefics3-8b, smolvlm-256m, smolvlm-500m, smoldocling-256m, "
        "granite-docling-258m, lightonocr-2-1b: docs/models.md), or the hub id or local folder of a checkpoint of a "
        "supported family (Idefics2, Idefics3, LightOnOCR), or 'tiny-random' (Idefics2), 'tiny-random-idefics3', "
        "'tiny-random-granite-docling', 'tiny-random-lighton' for a locally built random model (tests and CPU "
        "demos: its text is meaningless).",
        examples=[DEFAULT_MODEL, "granite-docling-258m", "/models/idefics2-8b", TINY_MODEL],
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype. 'auto': bfloat16 on a CUDA GPU, float32 on the CPU."
    )
    attention: Literal["auto", "flash_attention_3", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel. 'auto': on a GPU flash_attention_3 when flash_attn_interface is "
        "installed, else flash_attention_2 when flash_attn is, else sdpa; sdpa on a CPU. The manifest's engines "
        "record what ran.",
    )
    do_image_splitting: bool | None = Field(
        None, description="Split each page into 4 crops plus the whole page (5 images). Default (null): the "
        "checkpoint's own setting (on for idefics2-8b, off for idefics2-8b-base); it sets the render size too.",
    )
    max_new_tokens: int = Field(
        1024, ge=1, description="Cap on generated tokens per page. Unset, the model's budget: 8192 for the DocTags "
        "models (a page's tags and boxes are long), 4096 for LightOnOCR, else this.",
    )
    min_new_tokens: int = Field(
        0, ge=0, description="Force at least this many tokens per page (benchmarks: a fixed output length)."
    )
    batch_size: int = Field(
        4, ge=1, description="Pages per generate() call; with the continuous engine, pages per vision-encoder call."
    )
    sort_window: int = Field(
        4,
        ge=1,
        description="Model batches the actor receives at once; their pages are sorted by shape before batching, "
        "so pages padded together are of similar size.",
    )
    engine: Literal["auto", "generate", "continuous"] = Field(
        "auto",
        description="How pages are decoded. 'continuous': transformers' continuous batching (a page leaves the "
        "batch when it is done and the next takes its slot; image features reach it through a feature bank). "
        "'generate': static batches of batch_size through generate(). 'auto': continuous on a CUDA GPU, falling "
        "back to generate (with the reason in the run's manifest) if it cannot start there; generate on a CPU.",
    )
    calls_in_flight: int = Field(
        2, ge=1, le=16,
        description="Blocks of rows_per_call pages a model actor works on at once with the continuous engine, so it "
        "takes new pages while earlier ones decode. Bounds the pages held per actor: calls_in_flight x rows_per_call.",
    )
    max_pages_in_flight: int | None = Field(
        None, ge=1,
        description="Pages the continuous engine holds at once on a GPU (its decode batch's cap). Default (null): "
        "sized from the GPU memory left after loading (each page's KV cache and image-encoding peak), up to 256: "
        "about 180 for idefics2-8b in bf16 on an 80 GB card (computed: pipeline/model/sizing.py); at most 64 with "
        "transformers' packed sdpa (engine_attention), whose step slows down with more. On a CPU: "
        "calls_in_flight x rows_per_call.",
    )
    engine_attention: Literal["auto", "sdpa", "varlen"] = Field(
        "auto",
        description="The continuous engine's attention. 'auto': flash-attn's own paged kernels when the model loaded "
        "with flash attention; on a CUDA GPU without flash-attn, PyTorch's own FlashAttention kernels (varlen, paged "
        "where the torch has it: 2.12 on); transformers' packed sdpa otherwise (its pages in flight capped, its cost "
        "grows with their square). 'varlen' on a CPU runs its reference computation (tests). The manifest's engines "
        "record what ran.",
    )
    gpu_memory_share: float = Field(
        1.0, gt=0, le=1,
        description="Share of the GPU's memory the continuous engine sizes itself from: 1/actors_per_gpu when actors "
        "share a GPU (set by the run from actors_per_gpu).",
    )
    engine_stall_timeout_s: float = Field(
        600.0, gt=0,
        description="The continuous engine's loop is taken for dead when it makes no step for this long while pages "
        "wait (it stopped, or a kernel hangs): those pages are retried with generate, which the actor then runs.",
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="bitsandbytes weight quantisation (4bit: nf4 with double quantisation). CUDA only."
    )
    static_cache: bool = Field(False, description="Use a static KV cache in generate (pairs with compile).")
    compile: bool = Field(False, description="torch.compile the model's forward pass.")
    processor_device: Literal["model", "cpu"] = Field(
        "model", description="Where the image processor runs: on the model's device (GPU when there is one) or the CPU."
    )
    @property
    def rows_per_call(self) -> int:
        """Pages an actor takes at once: sort_window batches' worth, sorted by shape, then run batch by batch."""
        return self.batch_size * self.sort_window

    @property
    def pages_in_flight(self) -> int:
        """The most pages a model actor holds at once (the continuous engine's feature bank is sized for it)."""
        return self.rows_per_call * self.calls_in_flight

    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads in a CPU model actor. Default: the CPUs the actor was given."
    )
    prompt: str = Field(
        OCR_PROMPT, description="Instruction sent with each page image. Unset, the model's own: this one for "
        "Idefics2, Idefics3 and SmolVLM; 'Convert this page to docling.' for the DocTags models (SmolDocling, "
        "granite-docling); none for LightOnOCR, which is sent the page alone.",
    )
    trust_remote_code: bool = Field(False, description="Allow code shipped with the checkpoint to run.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    adapter: str | None = Field(
        None, description="Path (or hub id) of a PEFT/LoRA adapter to load on top of the model, e.g. a checkpoint "
        "fine-tuned for extraction."
    )


class RenderOptions(_Options):
    longest_edge: int | None = Field(
        None,
        ge=32,
        description="Longest side of a rendered page in pixels. Default: derived from the model's image processor "
        "(twice its longest_edge with image splitting, so each crop keeps full resolution: 1960 for Idefics2).",
    )
    max_pixels: int = Field(
        40_000_000, ge=1024, description="Cap on width*height of a rendered page, checked before allocating."
    )
    image_format: Literal["raw", "png", "jpeg"] = Field(
        "raw",
        description="Encoding of page images between the render and model stages. 'raw': lossless zstd-compressed "
        "RGB, several times faster to encode and decode than PNG; pages still over max_image_bytes (noisy scans, "
        "photos) fall back to JPEG.",
    )
    max_image_bytes: int = Field(
        2_000_000, ge=1, description="Largest 'raw' page image shipped between stages before falling back to JPEG."
    )
    jpeg_quality: int = Field(92, ge=1, le=100, description="JPEG quality (image_format jpeg, or the raw fallback).")
    document_timeout_s: float | None = Field(
        600.0, gt=0, description="Longest time to read and render one document. Rendering runs in a child "
        "process (MuPDF can't be interrupted in-process), killed when over time: the pages not yet rendered get "
        "error rows (error_type timeout) and the run goes on. A crash of the child is recorded the same way. "
        "null, with page_timeout_s null too, renders in-process without limits.",
    )
    page_timeout_s: float | None = Field(
        120.0, gt=0, description="Longest time for one page (or, before the first page, for opening the document).",
    )


class RouteOptions(_Options):
    """Which pages go to the model. Decided per page in the render stage (pipeline/render/route.py); a page answered
    otherwise (its PDF text layer, or blank) is never shipped to the model actors."""

    text_layer: Literal["never", "auto"] = Field(
        "auto",
        description="'auto': a PDF page whose text layer passes the trust rules (enough visible characters for its "
        "area, few replacement or private-use characters, every font mapped to Unicode, not a full-page image, "
        "no formulas) takes its text from that layer, as Markdown in the model's format (tables, headings, columns "
        "in reading order, running heads and page numbers dropped); the other pages go to the model, and each "
        "page's route_reason says why. 'never': every page goes to the model.",
    )
    trust_ocr_layer: bool = Field(
        False, description="With text_layer auto, also trust the invisible OCR layer that scanners put over a "
        "full-page image (its quality is that of the scanner's OCR, unknown here).",
    )
    min_chars: int = Field(20, ge=0, description="Fewest visible characters a text layer must have to be trusted.")
    min_chars_per_in2: float = Field(
        0.5, ge=0, description="Fewest visible characters per square inch of page (a letter page: 47). A sparser "
        "layer suggests the page's text is in its pixels.",
    )
    max_bad_char_fraction: float = Field(
        0.01, ge=0, le=1, description="Largest share of replacement (U+FFFD), private-use and control characters: "
        "fonts without a Unicode map produce them.",
    )
    max_garbled_word_fraction: float = Field(
        0.01, ge=0, le=1, description="Largest share of a text layer's words (at least one word allowed) that show a "
        "broken font map ('(cid:12)', letters of two scripts in one word: route_reason broken_font_map) or mojibake "
        "(UTF-8 read as Latin-1 or cp1252, 'Ã©': mojibake).",
    )
    max_hidden_char_fraction: float = Field(
        0.02, ge=0, le=1, description="Largest share of characters nobody sees: white on a light background "
        "(white on a dark band or picture is seen), fully transparent, invisible (render mode 3) or outside the page.",
    )
    max_math_chars: int = Field(
        10, ge=0, description="Most formula characters (letters and digits set in a math font such as CMMI, CMSY, "
        "CMEX, Symbol or STIX Math, and math symbols prose does not use, such as ∑ ∫ ≤) a trusted text layer may "
        "have: a page with more goes to the model (route_reason formulas), which writes formulas as LaTeX; a text "
        "layer has only their glyphs.",
    )
    skip_blank: bool = Field(
        True, description="Give blank pages (near-uniform rendered image) empty text without the model.",
    )
    blank_ink_delta: int = Field(
        48, ge=1, le=255, description="A cell of the rendered page (about 1/256 of its longest side, averaged, "
        "which evens out scanner noise) is ink when it differs from the page's median by more than this many "
        "grey levels.",
    )
    blank_max_ink_fraction: float = Field(
        0.0002, ge=0, le=1, description="A page whose ink cells are at most this share of its cells is blank "
        "(0.0002: less ink than a short word; dust specks stay under it).",
    )
    blank_margin: float = Field(
        0.04, ge=0, lt=0.5, description="Share of each side ignored by blank detection: scanner edges, shadows "
        "and faint borders.",
    )


class ExtractOptions(_Options):
    """JSON extraction (task 'extract' or 'ocr+extract')."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    schema_spec: str | None = Field(
        None,
        alias="schema",
        description="A built-in schema name (invoice, receipt, key_values), a 'module:Class' pydantic model, or a "
        "JSON Schema file.",
        examples=["invoice", "mypkg.schemas:PurchaseOrder", "schemas/po.json"],
    )
    prompt: str | None = Field(None, description="Replaces the prompt built from the schema's fields.")
    model: str | None = Field(
        None, description="The model that turns pages into JSON when the run's model is OCR-only (the DocTags "
        "models and LightOnOCR read pages but follow no instruction): the page text that model wrote is given to "
        "this one with the schema's prompt, grammar and validation. Any --model value of a family that follows "
        "instructions. Default: idefics2-8b. Unused when the run's model follows instructions.",
        examples=["idefics2-8b", "smolvlm-500m"],
    )
    page_cap: int = Field(
        8, ge=1, description="Pages sent together in one prompt. A longer document is extracted per chunk of this "
        "many pages and the chunks are merged (first non-null value per field wins; lists are concatenated).",
    )
    max_new_tokens: int = Field(1024, ge=1, description="Cap on generated tokens per extraction.")
    max_string_chars: int = Field(512, ge=1, description="Longest string the grammar lets the model write.")
    max_array_items: int = Field(100, ge=0, description="Most items the grammar lets the model put in a list.")
    max_abs_number: float = Field(1e12, gt=0, description="Numbers are generated within +/- this bound.")
    max_repeat: int = Field(64, ge=2, description="Stop generation when one token repeats this many times in a row.")
    retry_temperature: float = Field(
        0.8, ge=0, description="Output that fails validation is retried once, sampling at this temperature (0: no retry)."
    )


class StorageOptions(_Options):
    """Object storage settings. Unset values follow the AWS conventions: credentials from the SDK's chain
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance role), the endpoint from AWS_ENDPOINT_URL_S3
    or AWS_ENDPOINT_URL, the region from AWS_REGION or AWS_DEFAULT_REGION."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, R2), e.g. http://minio:9000.",
        examples=["http://127.0.0.1:9000"],
    )
    region: str | None = Field(None, description="S3 region (default us-east-1 when nothing else says).")
    access_key_id: SecretStr | None = Field(None, description="Explicit access key id (prefer the environment).")
    secret_access_key: SecretStr | None = Field(None, description="Explicit secret key; never logged or recorded.")
    session_token: SecretStr | None = Field(None, description="Explicit session token; never logged or recorded.")
    anonymous: bool = Field(False, description="Unsigned requests, for public buckets.")
    max_attempts: int = Field(
        8, ge=1, description="Attempts per request; throttling, 5xx and dropped connections are retried with backoff."
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="Seconds to establish a connection.")
    request_timeout_s: float = Field(60.0, gt=0, description="Seconds for one request.")
    retry_time_limit_s: float = Field(120.0, gt=0, description="Retry budget for gs:// requests, in seconds.")


_SECRET_KEY = re.compile(r"secret|password|token|credential|key", re.I)
_URI_PASSWORD = re.compile(r"(://[^:/@]+:)[^@]*@")


class IcebergOptions(_Options):
    """Append each run's rows to Apache Iceberg tables, one commit per table, so lake readers see a run appear
    whole. The Parquet dataset under ``output`` is written either way."""

    catalog: dict[str, str] | None = Field(
        None,
        description="pyiceberg catalog properties; null turns the append off. E.g. {type: sql, uri: "
        "'sqlite:////data/catalog.db', warehouse: 'file:///data/warehouse'}, or {type: rest, uri: ...}.",
    )
    catalog_name: str = Field("docpipe", description="Name given to the catalog (pyiceberg's load_catalog).")

    @field_serializer("catalog")
    def _redact(self, catalog: dict[str, str] | None):
        # Manifests record the configuration: keep credentials out of them.
        if catalog is None:
            return None
        return {k: "**********" if _SECRET_KEY.search(k) else _URI_PASSWORD.sub(r"\1**********@", v)
                for k, v in catalog.items()}

    def secret_properties(self) -> list[str]:
        """The catalog properties that carry a secret: by their name, or a password inside a URI."""
        return [k for k, v in (self.catalog or {}).items() if _SECRET_KEY.search(k) or _URI_PASSWORD.search(v)]

    namespace: str = Field("docpipe", description="Namespace holding the tables; created if missing.")
    pages_table: str = Field("pages", description="Table for page rows; created on first use, with ingest_date.")
    documents_table: str = Field("documents", description="Table for document rows; created on first use.")
    current_table: str = Field(
        "documents_current", description="Table with one row per source URI, its latest documents row (each run's "
        "rows merged on source_uri): the current state of every file. Created on first use.",
    )


class RunConfig(_Options):
    inputs: list[str] = Field(
        default_factory=list,
        description="Files, folders or prefixes (searched recursively) and glob patterns; local paths or URIs "
        "(s3://bucket/prefix, gs://, abfs://).",
    )
    manifests: list[str] = Field(
        default_factory=list,
        description="Files listing input URIs, instead of (or beside) listing: .txt (one per line), .csv (column "
        "'uri', else the first) or .parquet (column 'uri' or 'source_uri').",
    )
    include: list[str] = Field(
        default_factory=list,
        description="Keep only listed files matching one of these globs (on the file name, or on the path when the "
        "glob has a '/'), e.g. '*.pdf', which also keeps SCAN0001.PDF (see case_sensitive_globs). The files left "
        "out are counted and named in the summary and the run's manifest.",
    )
    exclude: list[str] = Field(default_factory=list, description="Drop listed files matching one of these globs.")
    case_sensitive_globs: bool = Field(
        False, description="Match include and exclude globs with case: '*.pdf' then leaves out SCAN0001.PDF.",
    )
    output: str = Field(description="Output folder or URI: pages/, documents/ and _runs/ are written under it.")
    storage: StorageOptions = Field(default_factory=StorageOptions)
    task: Literal["ocr", "extract", "ocr+extract"] = Field(
        "ocr", description="ocr: text per page; extract: JSON per document; ocr+extract: both in one pass."
    )
    extract: ExtractOptions = Field(default_factory=ExtractOptions)
    model: ModelOptions = Field(default_factory=ModelOptions)
    render: RenderOptions = Field(default_factory=RenderOptions)
    route: RouteOptions = Field(default_factory=RouteOptions)
    num_actors: int | None = Field(
        None, ge=1, description="Model actors. Default: actors_per_gpu per GPU in the cluster; without GPUs, one "
        "CPU actor per CPU of the cluster (each with one torch thread: faster than fewer actors with more threads)."
    )
    actors_per_gpu: int = Field(1, ge=1, le=8, description="Model actors sharing each GPU (each gets 1/N of it).")
    actor_memory_gb: float = Field(
        4.0, gt=0, description="Host memory (GiB) Ray reserves for each model actor (torch, the processor and staged "
        "weights: a tiny-random CPU actor peaked at 2.9 GiB here)."
    )
    read_concurrency: int | None = Field(
        None, ge=1, description="Parallel read-and-render tasks. Default: let Ray Data decide."
    )
    rows_per_file: int = Field(100_000, ge=1, description="Rows per Parquet file before a new file is started.")
    checkpoint_s: float = Field(
        300.0, gt=0, description="Seal the open Parquet files at least this often, so a crashed run loses at most "
        "this much finished work: a rerun skips what was sealed. Each seal starts new files, so this and "
        "rows_per_file set the file sizes: a run writes about one file per table per checkpoint.",
    )
    partition_by: Literal["ingest_date", "none"] = Field(
        "ingest_date", description="Hive-style partition folders: 'ingest_date' writes pages/ingest_date=YYYY-MM-DD/"
        "part-*.parquet (the run's UTC start date); 'none' writes straight into pages/ and documents/.",
    )
    iceberg: IcebergOptions = Field(default_factory=IcebergOptions)
    resume: bool = Field(
        True, description="Incremental runs: skip documents already recorded ok (or skipped) in this output with "
        "the same URI, size and modification time, or with the same bytes (doc_id); process new and changed ones "
        "and retry those in error, except failures the bytes alone decide (retry_failed). An input skipped unchanged "
        "gets no row (its earlier row stands; the manifest counts it); one whose bytes are ok under another URI "
        "gets a 'skipped' row.",
    )
    retry_failed: bool = Field(
        False, description="Also retry documents that failed for good and are unchanged since: empty, not a PDF or "
        "an image, corrupt, encrypted, without pages, over the pixel cap, or with content lost. Without it they "
        "are not read again while their size and modification time stay the same.",
    )
    fail_on_invalid: bool = Field(
        False, description="Exit with status 3 when any extraction is not valid against its schema (the run "
        "still writes everything; the summary's extraction line counts them).",
    )
    lease_expiry_s: float = Field(
        300.0, gt=0, description="One run at a time per output: a run holds a lease on it (OUT/_lease.json, "
        "renewed every third of this), and a lease not renewed for this long is taken over by the next run. A "
        "holder that ran on the same host and whose process is gone is taken over at once.",
    )
    wait_for_output_s: float | None = Field(
        None, ge=0, description="When another live run holds the output's lease: null stops at once (exit 2, "
        "naming the holder); a number waits up to this many seconds for it to finish (or die), then stops the "
        "same way.",
    )
    fail_fast: bool = Field(
        False, description="Stop at the first error and show its traceback (for development). Runs the stages in "
        "this process, without Ray.",
    )
    executor: Literal["ray", "local"] = Field(
        "ray", description="'ray': the Ray Data plan (local Ray, or the cluster in RAY_ADDRESS). 'local': the same "
        "stages in a plain loop in this process, for debugging.",
    )
    progress: bool = Field(
        True, description="Show Ray Data's progress bars when stderr is a terminal. Otherwise (a log file, a batch "
        "job, --no-progress) docpipe prints its own progress lines, and Ray's progress bars and log lines go to "
        "Ray's session log folder instead of stderr.",
    )
    markdown: str | None = Field(
        None, description="Also write one Markdown file per document under this folder or URI, as its documents "
        "row is written (docs/python.md#markdown-files: names, page markers, failed pages). Documents skipped "
        "as done are not rewritten: `docpipe export OUT --markdown DIR` writes every document's latest result.",
        examples=["out-md", "s3://bucket/markdown/"],
    )
    pages: str | None = Field(
        None, description="Only these pages of each document, 1-based: '1-5,8', '3-' (page 3 to the end). Pages "
        "outside the selection are neither rendered nor written; page_count in both tables stays the document's "
        "own count. A document with no page in the selection is an error row (empty_document). A document done "
        "under another selection is processed again (resume compares the runs' selections).",
        examples=["1-5,8", "1", "2-"],
    )
    password: SecretStr | None = Field(
        None, description="Password for encrypted PDFs, tried on each one. Default: password_file's, else the "
        "DOCPIPE_PDF_PASSWORD environment variable's (read by the run's driver). Never logged or recorded (the manifest shows it masked); prefer "
        "the variable or the file to the --password flag, which other users can see in the process list.",
    )
    password_file: str | None = Field(
        None, description="A file holding the PDF password (its first line), e.g. a mounted Kubernetes or Docker "
        "secret: read when the run starts.",
        examples=["/run/secrets/pdf-password"],
    )
    passwords: str | None = Field(
        None, description="A YAML or JSON file mapping paths or globs to passwords, for PDFs with their own: "
        "{'/data/hr/*.pdf': 'p1', 'contract-7.pdf': 'p2'}. A key with a '/' matches the end of the document's path "
        "or URI, one without matches its file name (as include globs do); the first match is tried first, then "
        "the run's password.",
        examples=["/run/secrets/pdf-passwords.yaml"],
    )

    @field_validator("pages")
    @classmethod
    def _valid_pages(cls, value: str | None) -> str | None:
        if value is not None:
            parse_pages(value)
        return value

    @property
    def page_spans(self) -> tuple[tuple[int, int | None], ...] | None:
        """``pages`` parsed (parse_pages); None: every page."""
        return parse_pages(self.pages) if self.pages else None
    progress_interval_s: float = Field(
        30.0, gt=0, description="Without progress bars (--no-progress, or not a terminal, as in Ray Jobs), log a "
        "progress line (documents and pages done, pages/s, errors) at least this often.",
    )


class LoraOptions(_Options):
    """The LoRA adapter trained on the text model (PEFT)."""

    rank: int = Field(16, ge=1, description="LoRA rank r: the size of each low-rank update.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: updates are scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Projections of the text model's layers (self_attn.* and mlp.*) that get an adapter; the "
        "vision tower and the perceiver stay frozen and unadapted.",
    )


class FinetuneConfig(_Options):
    """`docpipe finetune`: a LoRA adapter trained on reviewed output, loadable with `docpipe run --adapter`."""

    train: str = Field(
        description="Training examples in the shape docpipe writes: pages rows (source_uri, page_number, text) "
        "for OCR, or documents rows (source_uri, extraction, and schema or schema_name) for extraction. A Parquet "
        "file or folder (e.g. OUT/pages), or JSONL (one object a line with those keys).",
        examples=["corrected/pages.parquet", "reviewed.jsonl"],
    )
    eval: str | None = Field(None, description="Evaluation examples, same shape as train: a loss per epoch.")
    output: str = Field(description="Folder for the adapter, its record (docpipe_finetune.json) and checkpoints.")
    model: ModelOptions = Field(
        default_factory=ModelOptions,
        description="The base model, loaded as `docpipe run` loads it (the same dtype, attention and image "
        "splitting; quantization 4bit here means QLoRA, on CUDA only). Use the same options when running.",
    )
    render: RenderOptions = Field(default_factory=RenderOptions, description="Page rendering, as in runs.")
    extract: ExtractOptions = Field(
        default_factory=ExtractOptions,
        description="Extraction examples: the schema (when rows don't name one), the prompt and page_cap, as in runs.",
    )
    storage: StorageOptions = Field(default_factory=StorageOptions)
    lora: LoraOptions = Field(default_factory=LoraOptions)
    epochs: int = Field(3, ge=1, description="Passes over the training examples.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up (transformers' get_scheduler)."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the optimizer steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(1, ge=1, description="Examples per forward pass (per worker).")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Forward passes per optimizer step: the effective batch is batch_size x this x workers."
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: less memory for about a third more time."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm (null: no clipping).")
    seed: int = Field(0, description="Seeds the adapter's initialisation, dropout and the example order.")
    checkpoint_steps: int = Field(
        50, ge=1, description="Save a checkpoint every this many optimizer steps (and at each epoch's end); a "
        "killed run started again with the same options resumes from the last one.",
    )
    resume: bool = Field(True, description="Resume from the output's last checkpoint when there is one.")
    skip_invalid: bool = Field(
        False, description="Drop examples that can't be used (unreadable document, page out of range, extraction "
        "not valid for its schema) with a count, instead of stopping before training.",
    )
    num_workers: int = Field(
        1, ge=1, description="Data-parallel training workers through Ray Train (TorchTrainer): one per GPU, or CPU "
        "processes (gloo) without GPUs. 1: train in this process, without Ray.",
    )
