"""The ``docpipe`` command."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from docpipe.config import DEFAULT_MODEL, FinetuneConfig, RunConfig
from docpipe.errors import FatalError


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"a preset (idefics2-8b, granite-docling-258m, lightonocr-2-1b, ...: docs/models.md), "
                   f"a hub id or local path, or 'tiny-random' (default {DEFAULT_MODEL})")
    p.add_argument("--batch-size", type=int, help="pages per generate() call (continuous engine: per vision call)")
    p.add_argument("--engine", choices=["auto", "generate", "continuous"],
                   help="decoding engine: continuous batching, static generate() batches, or auto (default: "
                   "continuous on a GPU, generate on a CPU)")
    p.add_argument("--calls-in-flight", type=int, metavar="N",
                   help="blocks a model actor works on at once with the continuous engine (default 2)")
    p.add_argument("--max-new-tokens", type=int, help="cap on generated tokens per page")
    p.add_argument("--longest-edge", type=int, help="rendered page size in pixels (default: from the processor)")
    p.add_argument("--image-format", choices=["raw", "png", "jpeg"], help="page image encoding between stages")
    p.add_argument("--page-timeout", type=float, metavar="SECONDS", help="limit for rendering one page (default 120)")
    p.add_argument("--document-timeout", type=float, metavar="SECONDS",
                   help="limit for reading and rendering one document (default 600)")
    p.add_argument("--num-actors", type=int, help="model actors (default: one per GPU; without GPUs, one per CPU "
                   "core)")
    p.add_argument("--actor-memory-gb", type=float, help="host memory Ray reserves for each model actor (default 4)")
    p.add_argument("--no-image-splitting", action="store_true", help="send each page as one image, not 5")
    p.add_argument("--adapter", help="a PEFT/LoRA adapter (path or hub id) to load on top of the model")
    p.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars even on a terminal: "
                   "docpipe's own progress lines instead (as when stderr is not a terminal)")


def _add_document_args(p: argparse.ArgumentParser) -> None:
    """What to make of each document, for `run`, `submit` and `convert` alike."""
    p.add_argument("--task", choices=["ocr", "extract", "ocr+extract"],
                   help="ocr (default): text per page; extract: JSON per document; ocr+extract: both in one pass")
    p.add_argument("--schema", help="extraction schema: invoice, receipt, key_values, a JSON Schema file, or "
                   "module:Class, a pydantic model imported as `python -m` would (the working directory first)")
    p.add_argument("--page-cap", type=int, help="pages per extraction prompt (default 8); longer documents are chunked")
    p.add_argument("--extract-max-new-tokens", type=int, help="cap on generated tokens per extraction (default 1024)")
    p.add_argument("--extract-model", help="with an OCR-only model (DocTags, LightOnOCR): the model that turns its "
                   "page text into JSON (default idefics2-8b)")
    p.add_argument("--pages", metavar="RANGES", help="only these pages of each document, 1-based: 1-5,8 or 3- (page 3 "
                   "to the end); the others are neither rendered nor written")
    p.add_argument("--password", help="password for encrypted PDFs (prefer DOCPIPE_PDF_PASSWORD or --password-file: "
                   "a flag shows in the process list); never logged or recorded")
    p.add_argument("--password-file", metavar="FILE", help="a file holding the PDF password (its first line), e.g. "
                   "a mounted secret")
    p.add_argument("--passwords", metavar="FILE", help="YAML or JSON mapping paths or globs to PDF passwords, e.g. "
                   "'hr/*.pdf: s3cret'")
    p.add_argument("--text-layer", choices=["never", "auto"],
                   help="auto (default): a PDF page with a trustworthy text layer and no formulas takes its text "
                   "from it, as Markdown (no model call); never: the model reads every page")
    p.add_argument("--trust-ocr-layer", action="store_true",
                   help="with --text-layer auto, also trust a scan's invisible OCR layer")
    p.add_argument("--no-skip-blank", action="store_true", help="send blank pages to the model too")
    _add_storage_args(p)


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    p.add_argument("--region", help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    p.add_argument("--anonymous", action="store_true", help="unsigned S3 requests (public buckets)")


def _storage_from_args(args: argparse.Namespace):
    from docpipe.config import StorageOptions

    return StorageOptions(**{k: v for k, v in (("endpoint_url", args.endpoint_url), ("region", args.region),
                                                ("anonymous", args.anonymous or None)) if v is not None})


def _add_run_args(run: argparse.ArgumentParser) -> None:
    run.add_argument("inputs", nargs="*", metavar="INPUT",
                     help="file, folder or glob; local or s3://bucket/prefix (also gs://, abfs://)")
    run.add_argument("--config", metavar="FILE", help="a job configuration (YAML or JSON); flags given here override it")
    run.add_argument("--output", "-o", metavar="OUT", help="output folder or URI")
    run.add_argument("--markdown", metavar="DIR", help="also write one Markdown file per document under DIR (a "
                     "folder or URI), named by its path below the inputs' folder, pages marked <!-- page N -->")
    run.add_argument("--manifest", action="append", default=[], metavar="FILE",
                     help="a .txt, .csv or .parquet file listing input URIs (repeatable)")
    run.add_argument("--include", action="append", default=[], metavar="GLOB", help="keep only matching files, e.g. '*.pdf'")
    run.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="drop matching files")
    run.add_argument("--fail-fast", action="store_true",
                     help="stop at the first error and show its traceback (runs in this process, without Ray)")
    run.add_argument("--no-resume", action="store_true", help="process every input, even those already ok in OUT")
    run.add_argument("--retry-failed", action="store_true",
                     help="also retry unchanged inputs that failed for good before (empty, not a PDF or image, "
                     "corrupt, encrypted): by default they are not read again until they change")
    run.add_argument("--fail-on-invalid", action="store_true",
                     help="exit with status 3 if any extraction is not valid against the schema")
    run.add_argument("--wait-for-output", type=_wait_seconds, nargs="?", const=24 * 3600.0, metavar="SECONDS",
                     help="when another run holds OUT's lease, wait for it (up to SECONDS; default a day) instead of "
                     "stopping with exit 2; before the inputs, write --wait-for-output=SECONDS")
    run.add_argument("--lease-expiry", type=float, metavar="SECONDS",
                     help="a lease on OUT not renewed for this long is taken over by the next run (default 300)")
    run.add_argument("--checkpoint-seconds", type=float, help="seal output files at least this often (default 300)")
    run.add_argument("--iceberg-catalog", action="append", default=[], metavar="KEY=VALUE",
                     help="a pyiceberg catalog property (repeatable), e.g. type=sql uri=sqlite:///cat.db "
                     "warehouse=file:///data/wh: append each run to Iceberg tables")
    run.add_argument("--partition-by", choices=["ingest_date", "none"],
                     help="Hive partition folders for pages/ and documents/ (default ingest_date)")
    run.add_argument("--progress-interval", type=float, metavar="SECONDS",
                     help="seconds between progress lines when there are no progress bars (default 30)")
    _add_document_args(run)
    _add_engine_args(run)


def _wait_seconds(text: str) -> float:
    """--wait-for-output's optional SECONDS: the option takes the next word, so an input placed after it
    would be read as the seconds; say how to write it instead."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected SECONDS, got {text!r}: write --wait-for-output=SECONDS, or put --wait-for-output after "
            "the inputs") from None


# Each subcommand's --help ends with examples a newcomer can copy (docs/reference/cli.md shows them too).
EXAMPLES = {
    "docpipe": """\
  docpipe run scans/ -o out/                          # OCR a folder: out/pages, out/documents, out/_runs
  docpipe run s3://bucket/in --include '*.pdf' -o s3://bucket/out
  docpipe run invoices/ -o out/ --task extract --schema invoice
  docpipe report out/                                 # a static HTML report of the latest run
  docpipe demo                                        # sample documents through the tiny model""",
    "run": """\
  docpipe run scans/ -o out/
  docpipe run scans/ -o out/ --model tiny-random      # a quick check on a CPU (random weights: no real text)
  docpipe run 's3://bucket/in/**/*.pdf' -o s3://bucket/out --endpoint-url http://minio:9000
  docpipe run inbox/ -o out/ --task extract --schema mymodels:PurchaseOrder --fail-on-invalid
  docpipe run --config jobs/nightly_invoices.yaml     # a job file; flags given here override it
  docpipe run scans/ -o out/ --retry-failed           # also retry files that failed for good before""",
    "convert": """\
  docpipe convert report.pdf > report.md                # Markdown on stdout, pages marked <!-- page N -->
  docpipe convert scans/*.pdf --markdown md/            # one Markdown file per document
  docpipe convert invoice.pdf --task extract --schema invoice
  cat scan.png | docpipe convert - --model tiny-random""",
    "export": """\
  docpipe export out/ --markdown md/                   # each document's latest result as a Markdown file""",
    "submit": """\
  docpipe submit --address http://head:8265 --wait s3://bucket/in -o s3://bucket/out
  docpipe submit --address http://head:8265 --no-working-dir --config jobs/lake_ingest.yaml""",
    "eval": """\
  docpipe eval out/ --labels labels.jsonl --json scores.json
  docpipe eval out/ --against text-layer""",
    "report": """\
  docpipe report out/                                 # out/_reports/RUN_ID/index.html
  docpipe report s3://bucket/out -o site/ --run 20260101T020000Z-a1b2c3""",
    "finetune": """\
  docpipe finetune --train corrected/pages -o adapters/forms --model tiny-random --epochs 1
  docpipe run forms/ -o out/ --adapter adapters/forms""",
}


def _examples(name: str) -> str:
    return "examples:\n" + EXAMPLES[name]


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter  # keeps the examples' lines as written
    parser = argparse.ArgumentParser(prog="docpipe", description="PDFs and images -> Idefics2 OCR -> Parquet.",
                                     epilog=_examples("docpipe"), formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="process documents into OUT/pages, OUT/documents and OUT/_runs",
                         epilog=_examples("run"), formatter_class=raw)
    _add_run_args(run)
    run.add_argument("--config-json", help=argparse.SUPPRESS)  # how `docpipe submit` hands a job its configuration
    run.add_argument("--dry-run", action="store_true", help="list what the run would process, filter out and skip "
                     "(resume), and why, then stop: no document is read, nothing is written, exit 0")

    convert = sub.add_parser("convert", help="one or a few files to Markdown on stdout (JSON for extraction), in "
                             "this process: no output folder, no Ray; exit 0 when every document is ok, 1 when one "
                             "is not (a line each on stderr), 2 on a fatal error",
                             epilog=_examples("convert"), formatter_class=raw)
    convert.add_argument("inputs", nargs="+", metavar="FILE", help="a file, folder or glob, local or a URI; - reads "
                         "one document from stdin")
    convert.add_argument("--config", metavar="FILE", help="a job configuration (YAML or JSON) for the options; flags "
                         "override it")
    convert.add_argument("--json", action="store_true", help="one JSON object per document and line (status, errors, "
                         "markdown, extraction), also for --task ocr; the default for extraction")
    convert.add_argument("--markdown", metavar="DIR", help="write one Markdown file per document under DIR instead of "
                         "stdout, and print their paths")
    convert.add_argument("--include", action="append", default=[], metavar="GLOB",
                         help="in a folder, keep only matching files, e.g. '*.pdf'")
    convert.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="in a folder, drop matching files")
    convert.add_argument("--fail-fast", action="store_true", help="stop at the first error and show its traceback")
    _add_document_args(convert)
    _add_engine_args(convert)

    export = sub.add_parser("export", help="write files from an output: one Markdown file per document (its latest "
                            "result), pages marked <!-- page N -->", epilog=_examples("export"), formatter_class=raw)
    export.add_argument("out", metavar="OUT", help="a docpipe output folder or URI (what `docpipe run -o` wrote)")
    export.add_argument("--markdown", metavar="DIR", required=True, help="the folder or URI for the Markdown files")
    _add_storage_args(export)

    submit = sub.add_parser("submit", help="run on a Ray cluster as a Ray job (Job Submission API)",
                            epilog=_examples("submit"), formatter_class=raw)
    submit.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    submit.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 0 only if "
                        "it succeeded")
    submit.add_argument("--working-dir", help="folder uploaded as the job's working directory (default: this "
                        "docpipe source tree when run from a checkout)")
    submit.add_argument("--no-working-dir", action="store_true", help="upload nothing: docpipe is installed in the "
                        "cluster's image")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the job (repeatable)")
    submit.add_argument("--submission-id", help="the job id to use (default: Ray picks one)")
    _add_run_args(submit)

    demo = sub.add_parser("demo", help="write sample documents, run the pipeline over them, print a summary")
    demo.add_argument("--workdir", default="demo_output", help="where samples and results go (default ./demo_output)")
    _add_engine_args(demo)

    ft = sub.add_parser("finetune", help="train a LoRA adapter on reviewed pages or documents rows, for run --adapter",
                        epilog=_examples("finetune"), formatter_class=raw)
    ft.add_argument("--train", metavar="FILE", help="examples: pages rows (source_uri, page_number, text) or documents "
                    "rows (source_uri, extraction, schema); Parquet file or folder, or JSONL")
    ft.add_argument("--eval", metavar="FILE", help="evaluation examples, same shape: a loss per epoch")
    ft.add_argument("--output", "-o", metavar="ADAPTER_DIR", help="folder for the adapter, its record and checkpoints")
    ft.add_argument("--config", metavar="FILE", help="a fine-tuning job file (YAML or JSON); flags override it")
    ft.add_argument("--model", help=f"base model: hub id, local path, or 'tiny-random' (default {DEFAULT_MODEL})")
    ft.add_argument("--epochs", type=int, help="passes over the examples (default 3)")
    ft.add_argument("--learning-rate", type=float, help="peak learning rate (default 1e-4)")
    ft.add_argument("--lora-rank", type=int, help="LoRA rank (default 16)")
    ft.add_argument("--batch-size", type=int, help="examples per forward pass (default 1)")
    ft.add_argument("--gradient-accumulation", type=int, help="forward passes per optimizer step (default 1)")
    ft.add_argument("--num-workers", type=int, help="data-parallel workers through Ray Train (default 1: no Ray)")
    ft.add_argument("--schema", help="extraction schema for documents rows that don't name a loadable one")
    ft.add_argument("--qlora", action="store_true", help="4-bit base weights (bitsandbytes nf4; CUDA only)")
    ft.add_argument("--skip-invalid", action="store_true", help="drop unusable examples (with a count) instead of "
                    "stopping")
    ft.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has checkpoints")
    ft.add_argument("--seed", type=int, help="seed for the adapter's initialisation, dropout and example order")
    ft.add_argument("--longest-edge", type=int, help="rendered page size (default: from the processor, as in runs)")
    ft.add_argument("--no-image-splitting", action="store_true", help="one image per page, not 5 (as in the runs "
                    "the adapter will serve)")

    ev = sub.add_parser("eval", help="score OUT's page text (CER, WER) and extractions against references",
                        epilog=_examples("eval"), formatter_class=raw)
    ev.add_argument("output", metavar="OUT", help="a docpipe output folder or URI")
    reference = ev.add_mutually_exclusive_group(required=True)
    reference.add_argument("--labels", metavar="FILE", help="Parquet, JSONL or CSV: source_uri or doc_id, then "
                           "page_number and text (pages) or extraction, a JSON object (documents)")
    reference.add_argument("--against", choices=["text-layer"], help="text-layer: score model-read PDF pages "
                           "against their own trustworthy text layer (no labels needed)")
    ev.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE")
    ev.add_argument("--scores", metavar="FILE", help="per-page scores Parquet (default OUT/_eval/page-scores-*.parquet)")
    report = sub.add_parser("report", help="write a static HTML report of a run: overview, documents, pages "
                            "beside their text and JSON", epilog=_examples("report"), formatter_class=raw)
    report.add_argument("out", metavar="OUT", help="a docpipe output folder or URI (what `docpipe run -o` wrote)")
    report.add_argument("--run", metavar="RUN_ID", help="the run to show (default: the latest in OUT)")
    report.add_argument("--output", "-o", metavar="DIR", help="where the site goes, a folder or URI "
                        "(default OUT/_reports/RUN_ID)")
    report.add_argument("--max-documents", type=int, help="documents with a full view (default 100): errors and "
                        "partials first, then a sample")
    report.add_argument("--max-page-images", type=int, help="pages per document shown as images (default 50)")
    report.add_argument("--image-edge", type=int, help="longest side of page images in pixels (default 1000)")
    _add_storage_args(report)

    config = sub.add_parser("config", help="job configuration tools")
    config.add_argument("action", choices=["schema"], help="schema: print the configuration's JSON Schema (run "
                        "options; fine-tuning options under $defs.FinetuneConfig)")
    config.add_argument("--finetune", action="store_true", help="print the fine-tuning job file's schema alone")

    bench = sub.add_parser("bench", help="measure render, transfer and pipeline throughput against baselines")
    bench.add_argument("--pages", type=int,
                       help="pages in the synthetic corpus (default 200; with --engines 256 GPU, 64 CPU)")
    bench.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    bench.add_argument("--model", help="model to run (default: tiny-random, whose processor has the real sizes)")
    bench.add_argument("--random-weights", metavar="ARCH",
                       help="a shipped architecture with random weights, e.g. idefics2-8b (for GPUs)")
    bench.add_argument("--output-tokens", type=int, help="forced output tokens per page (default 600 GPU, 16 CPU); "
                       "with --engines, the cap of the length mix (default 1024 GPU, 64 CPU)")
    bench.add_argument("--engine-row", action="append", metavar="LABEL",
                       help="with --engines: run only the row with this label (repeatable), e.g. 'continuous'")
    bench.add_argument("--median-tokens", type=int,
                       help="with --engines: median of the output length mix (default 560 GPU, 24 CPU)")
    bench.add_argument("--batch-size", type=int, help="pages per generate() call in the pipeline")
    bench.add_argument("--no-image-splitting", action="store_true",
                       help="with --engines: each page as one image, as `docpipe run --no-image-splitting` reads it")
    bench.add_argument("--num-actors", type=int, help="model actors in the pipeline (default as for docpipe run)")
    bench.add_argument("--workdir", help="where the corpus and outputs go (default: a temporary folder)")
    bench.add_argument("--engines", action="store_true", help="instead: the model stage under each engine (generate, "
                       "continuous) and option (dtype, attention, bitsandbytes, static cache, torch.compile), side by "
                       "side, on a realistic output length mix; needs no Ray")
    bench.add_argument("--text-layer", action="store_true", help="instead: CPU seconds per text-layer page (median, "
                       "p90) on a mix of born-digital pages, for bare PyMuPDF text extraction, ours, and ours with the "
                       "layout analysis on every page, side by side; needs no Ray and no model (--pages default 60)")
    bench.add_argument("--gpu-check", action="store_true", help="instead: one short run that says what a GPU can do "
                       "and what docpipe gets from it, and why (versions, matmul and copy ceilings, per-page encode "
                       "cost, generate's decode step, the continuous engine's step per attention path beside its "
                       "roofline, agreement with logit margins, encode/decode overlap, both engines end to end with "
                       "the steady state apart); each section recorded even when another fails; needs no Ray and no "
                       "PyMuPDF. On a CPU: a dry run on tiny-random, sizes scaled down")
    return parser


def load_config_file(path: str) -> dict:
    """A job configuration file as a dict: YAML (loaded safely: no arbitrary objects) or JSON."""
    import json

    import yaml

    from docpipe.errors import ConfigError

    try:
        with open(path) as f:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())  # YAML's messages span lines; the error is one line
        raise ConfigError(f"cannot read config {path}: {type(exc).__name__}: {detail}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of options")
    return data


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def key_values(items: list[str], flag: str) -> dict[str, str]:
    from docpipe.errors import ConfigError

    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def config_from_args(args: argparse.Namespace, inputs: list[str], output: str | None) -> RunConfig:
    """The run configuration: the --config file (if any), with every flag given on the command line on top."""
    model = {
        "name": args.model,
        "batch_size": args.batch_size,
        "engine": getattr(args, "engine", None),
        "calls_in_flight": getattr(args, "calls_in_flight", None),
        "max_new_tokens": args.max_new_tokens,
        "do_image_splitting": False if args.no_image_splitting else None,
        "adapter": args.adapter,
    }
    extract = {"schema_spec": getattr(args, "schema", None), "page_cap": getattr(args, "page_cap", None),
               "max_new_tokens": getattr(args, "extract_max_new_tokens", None),
               "model": getattr(args, "extract_model", None)}
    render = {"longest_edge": args.longest_edge, "image_format": args.image_format,
              "page_timeout_s": args.page_timeout, "document_timeout_s": args.document_timeout}
    storage = {"endpoint_url": getattr(args, "endpoint_url", None), "region": getattr(args, "region", None),
               "anonymous": getattr(args, "anonymous", False) or None}
    route = {"text_layer": getattr(args, "text_layer", None),
             "trust_ocr_layer": True if getattr(args, "trust_ocr_layer", False) else None,
             "skip_blank": False if getattr(args, "no_skip_blank", False) else None}
    catalog = key_values(getattr(args, "iceberg_catalog", None) or [], "--iceberg-catalog")
    flags = {
        "inputs": inputs or None,
        "output": output,
        "manifests": getattr(args, "manifest", None) or None,
        "include": getattr(args, "include", None) or None,
        "exclude": getattr(args, "exclude", None) or None,
        "task": getattr(args, "task", None),
        "num_actors": args.num_actors,
        "actor_memory_gb": args.actor_memory_gb,
        "progress": False if args.no_progress else None,
        "fail_fast": True if getattr(args, "fail_fast", False) else None,
        "resume": False if getattr(args, "no_resume", False) else None,
        "retry_failed": True if getattr(args, "retry_failed", False) else None,
        "fail_on_invalid": True if getattr(args, "fail_on_invalid", False) else None,
        "checkpoint_s": getattr(args, "checkpoint_seconds", None),
        "wait_for_output_s": getattr(args, "wait_for_output", None),
        "lease_expiry_s": getattr(args, "lease_expiry", None),
        "partition_by": getattr(args, "partition_by", None),
        "progress_interval_s": getattr(args, "progress_interval", None),
        "markdown": getattr(args, "markdown", None),
        "pages": getattr(args, "pages", None),
        "password": getattr(args, "password", None),
        "password_file": getattr(args, "password_file", None),
        "passwords": getattr(args, "passwords", None),
        "model": {k: v for k, v in model.items() if v is not None},
        "render": {k: v for k, v in render.items() if v is not None},
        "route": {k: v for k, v in route.items() if v is not None},
        "storage": {k: v for k, v in storage.items() if v is not None},
        "extract": {("schema" if k == "schema_spec" else k): v for k, v in extract.items() if v is not None},
        "iceberg": {"catalog": catalog} if catalog else None,
    }
    flags = {k: v for k, v in flags.items() if v is not None and v != {}}
    base = load_config_file(args.config) if getattr(args, "config", None) else {}
    if getattr(args, "config_json", None):
        import json

        base = _deep_merge(base, json.loads(args.config_json))
    merged = _deep_merge(base, flags)
    if "output" not in merged:
        from docpipe.errors import ConfigError

        raise ConfigError("no output: give --output, or 'output' in the --config file")
    return RunConfig.model_validate(merged)


def finetune_config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The fine-tuning configuration: the --config file (if any), with the flags given on top."""
    from docpipe.errors import ConfigError

    model = {"name": args.model, "quantization": "4bit" if args.qlora else None,
             "do_image_splitting": False if args.no_image_splitting else None}
    flags = {
        "train": args.train, "eval": args.eval, "output": args.output, "epochs": args.epochs,
        "learning_rate": args.learning_rate, "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation, "num_workers": args.num_workers,
        "seed": args.seed, "skip_invalid": True if args.skip_invalid else None,
        "resume": False if args.no_resume else None,
        "lora": {"rank": args.lora_rank} if args.lora_rank else None,
        "extract": {"schema": args.schema} if args.schema else None,
        "render": {"longest_edge": args.longest_edge} if args.longest_edge else None,
        "model": {k: v for k, v in model.items() if v is not None} or None,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    merged = _deep_merge(load_config_file(args.config) if args.config else {}, flags)
    for key, flag in (("train", "--train"), ("output", "--output")):
        if key not in merged:
            raise ConfigError(f"no {key}: give {flag}, or '{key}' in the --config file")
    return FinetuneConfig.model_validate(merged)


def config_schema(finetune: bool = False) -> dict:
    """The run configuration's JSON Schema, with the fine-tuning options beside it in $defs (or those alone)."""
    tune = FinetuneConfig.model_json_schema(by_alias=True)
    if finetune:
        return tune
    schema = RunConfig.model_json_schema(by_alias=True)
    schema["$defs"].update(tune.pop("$defs", {}))
    schema["$defs"]["FinetuneConfig"] = tune
    return schema


def print_finetune_summary(record: dict, output: str, out=sys.stdout) -> None:
    losses = record["losses"]
    ex = record["examples"]
    print(f"adapter    {output} (base {record['base_model']}; load it with: docpipe run --adapter {output})", file=out)
    print(f"examples   {ex['train']} train, {ex['eval']} eval, {ex['skipped_invalid']} skipped (hash "
          f"{ex['hash'][:12]})", file=out)
    print(f"train loss {' '.join(f'{v:.4g}' for v in losses['train'])} (per epoch)", file=out)
    if losses["eval"]:
        print(f"eval loss  {' '.join(f'{v:.4g}' for v in losses['eval'])}", file=out)


def print_dry_run(plan, out=None) -> None:
    """`run --dry-run`: a line per listed document (what would happen to it, and why), then the counts."""
    out = out or sys.stdout  # looked up now: sys.stdout may have been replaced since this module was imported
    for action, uri, why in plan.entries:
        print(f"{action:<9} {uri}  ({why})", file=out)
    print(f"dry run    {plan.count('process')} to process, {plan.count('skip')} to skip, {plan.count('filtered')} "
          f"filtered out; output {plan.output} (nothing read or written)", file=out)


def convert_command(args: argparse.Namespace) -> int:
    """`docpipe convert`: documents to Markdown (or JSON) on stdout, or to files under --markdown DIR, as each is
    done. Exit 0 when every document is ok (and its extraction valid), 1 when one is not: each such document gets
    one `docpipe: URI: ...` line on stderr, and what it did make is still written."""
    import json

    from docpipe.api import _NO_OUTPUT, Converter
    from docpipe.errors import ConfigError

    config = config_from_args(args, [], _NO_OUTPUT)
    as_json = args.json or "extract" in config.task
    if args.markdown and config.task == "extract":
        raise ConfigError("--markdown writes the pages' text, which task extract does not read: use task ocr or "
                          "ocr+extract")
    sources = [sys.stdin.buffer.read() if arg == "-" else arg for arg in args.inputs]
    names = ["stdin" if arg == "-" else None for arg in args.inputs]
    if names.count("stdin") > 1:
        raise ConfigError("- (stdin) can be given once")
    writer = None
    if args.markdown:
        from docpipe.output.markdown import MarkdownWriter, common_folder, input_folder

        folders = [input_folder(a, {a}) for a in args.inputs if a != "-"]  # a remote argument: taken as a file
        writer = MarkdownWriter(args.markdown, common_folder(folders), config.storage)
    failed = 0
    # Several documents on stdout are told apart by a line naming each; one file alone gets none.
    many = len(args.inputs) > 1 or not all(a == "-" or os.path.isfile(a) for a in args.inputs)
    for done in Converter(config).convert_all(sources, names=names):
        if writer is not None:
            print(writer.out.path(writer.write(done.document, done.pages)))
        elif as_json:
            print(json.dumps(done.as_json(), ensure_ascii=False))
        else:
            if many:
                print(f"<!-- document {done.source_uri} -->\n")
            print(done.markdown)
        sys.stdout.flush()
        if not done.ok:
            failed += 1
            print(f"docpipe: {done.source_uri}: {done.problem}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def print_summary(result, out=sys.stdout) -> None:
    m = result.manifest
    docs = ", ".join(f"{k} {v}" for k, v in sorted(m.documents.items()) if k != "total")
    pages = ", ".join(f"{k} {v}" for k, v in sorted(m.pages.items()) if k != "total")
    unchanged_ok, unchanged_failed = (m.counters.get(k, 0) for k in ("skipped_unchanged_listing",
                                                                       "skipped_failed_unchanged"))
    print(f"run        {m.run_id}", file=out)
    print(f"documents  {m.documents['total']} ({docs or 'none'})", file=out)
    if unchanged_ok or unchanged_failed:  # no rows: their earlier rows stand
        failed = f", {unchanged_failed} failed for good before (--retry-failed reads them)" if unchanged_failed else ""
        print(f"unchanged  {unchanged_ok + unchanged_failed} not read: {unchanged_ok} ok before{failed}", file=out)
    print(f"pages      {m.pages['total']} ({pages or 'none'})", file=out)
    if m.errors:
        print("errors     " + ", ".join(f"{k} {v}" for k, v in m.errors.items()), file=out)
    valid, invalid = m.counters.get("extractions_valid", 0), m.counters.get("extractions_not_valid", 0)
    if valid or invalid:
        print(f"extraction valid {valid}, not valid {invalid}", file=out)
    filtered = m.counters.get("listing_filtered_out", 0)
    if filtered:
        shown = [uri.rsplit("/", 1)[-1] for uri in m.filtered[:5]]
        more = f" and {filtered - len(shown)} more" if filtered > len(shown) else ""
        print(f"filtered   {filtered} by --include/--exclude: {', '.join(shown)}{more}", file=out)
    sources = {s: m.counters.get(f"pages_{s}", 0) for s in ("model", "text_layer", "blank")}
    if any(sources.values()):
        print("text from  " + ", ".join(f"{k} {v}" for k, v in sources.items()), file=out)
    if m.engines:  # e.g. "engine     continuous 2 (requested)", or a fallback's reason
        from collections import Counter

        kinds = Counter((e["engine"], e["reason"]) for e in m.engines)
        print("engine     " + "; ".join(f"{name} x{n} ({why})" for (name, why), n in sorted(kinds.items())), file=out)
    print(f"time       {m.timings['wall_s']:.1f} s, {m.timings['pages_per_s']:.2f} pages/s", file=out)
    print(f"output     {result.output}/pages, {result.output}/documents", file=out)
    if m.config.get("markdown"):
        print(f"markdown   {m.counters.get('markdown_files', 0)} files in {m.config['markdown']}", file=out)
    print(f"record     {result.record}", file=out)


def exit_status(result) -> int:
    """0, or 3 with --fail-on-invalid when an extraction is not valid against its schema."""
    invalid = result.manifest.counters.get("extractions_not_valid", 0)
    return 3 if invalid and result.manifest.config.get("fail_on_invalid") else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            config = config_from_args(args, args.inputs, args.output)
            if args.dry_run:
                from docpipe.execute.preview import dry_run

                print_dry_run(dry_run(config))
                sys.stdout.flush()
                return 0
            from docpipe.execute.run import run

            result = run(config)
            print_summary(result)
            status = exit_status(result)
            if status:
                print(f"docpipe: {result.manifest.counters['extractions_not_valid']} extractions not valid against "
                      "the schema (--fail-on-invalid)", file=sys.stderr)
                sys.stdout.flush()
                return status
        elif args.command == "convert":
            return convert_command(args)
        elif args.command == "export":
            from docpipe.output.markdown import export_markdown

            exported = export_markdown(args.out, args.markdown, _storage_from_args(args))
            docs = ", ".join(f"{k} {v}" for k, v in sorted(exported.documents.items()))
            print(f"markdown   {exported.files} files in {args.markdown} (documents: {docs})")
        elif args.command == "submit":
            from docpipe.execute.submit import source_tree, submit

            working_dir = None if args.no_working_dir else (args.working_dir or source_tree())
            return submit(config_from_args(args, args.inputs, args.output), args.address, working_dir=working_dir,
                          env=key_values(args.env, "--env"), wait=args.wait, submission_id=args.submission_id)
        elif args.command == "demo":
            from docpipe.execute.run import run
            from docpipe.tools import demo

            inputs, output = demo.prepare(args)
            result = run(config_from_args(args, inputs, output))
            print()
            print_summary(result)
            demo.show(result)
        elif args.command == "eval":
            import json

            from docpipe.tools.evaluate import evaluate, print_report

            summary = evaluate(args.output, labels=args.labels, against=args.against, scores=args.scores)
            print_report(summary)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(summary, f, indent=2)
        elif args.command == "report":
            from docpipe.tools.report import ReportOptions, write_report

            storage = _storage_from_args(args)
            options = ReportOptions(**{k: v for k, v in (("max_documents", args.max_documents),
                                                         ("max_page_images", args.max_page_images),
                                                         ("image_edge", args.image_edge)) if v is not None})
            result = write_report(args.out, args.run, args.output, storage, options,
                                  log=lambda line: print(line, file=sys.stderr, flush=True))
            docs = ", ".join(f"{k} {v}" for k, v in result.documents.items())
            print(f"run        {result.run_id}")
            print(f"documents  {sum(result.documents.values())} ({docs or 'none'}); {result.full_views} with a full "
                  f"view, {result.page_images} page images")
            for note in result.notes:
                print(f"warning    {note}")
            print(f"report     {result.index}")
        elif args.command == "config":
            import json

            print(json.dumps(config_schema(args.finetune), indent=2))
        elif args.command == "finetune":
            from docpipe.execute.train import finetune

            config = finetune_config_from_args(args)
            print_finetune_summary(finetune(config), config.output)
        elif args.command == "bench":
            from docpipe.tools.bench import main as bench_main

            bench_main(args)
        sys.stdout.flush()  # here, not at exit: a reader gone by now (`| head`) is handled below
        return 0
    except FatalError as exc:
        print(f"docpipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        import signal

        signum = getattr(exc, "signum", signal.SIGINT)
        record = getattr(exc, "record", None)
        sealed = (f": {exc.documents} finished documents sealed, run record {record}; a rerun does the rest"
                  if record else "")
        print(f"docpipe: interrupted ({signal.Signals(signum).name}){sealed}", file=sys.stderr)
        return 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them
    except Exception as exc:
        from pydantic import ValidationError

        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            # `docpipe ... | head`: the reader has what it wanted. End quietly, as Unix tools do; stdout goes to
            # /dev/null so the interpreter's last flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if isinstance(exc, ValidationError):  # bad option values from the command line
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            print(f"docpipe: error: invalid option {where}: {first['msg']}", file=sys.stderr)
            return 2
        if getattr(args, "fail_fast", False):
            traceback.print_exc()
            print(f"docpipe: stopped at the first error (--fail-fast): {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        if os.environ.get("DOCPIPE_DEBUG"):
            traceback.print_exc()
            print(f"docpipe: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f"docpipe: internal error: {type(exc).__name__}: {exc} (set DOCPIPE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (and not, say, a socket of ours that broke)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll here, or stdout has no file descriptor
        return False


if __name__ == "__main__":
    sys.exit(main())
