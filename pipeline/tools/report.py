"""``docpipe report``: a static HTML site showing what one run did.

Reads a finished run back from OUT (its manifest, documents and pages), renders a sample of
its documents' pages afresh from their sources, through the same storage layer, render code
and render process as a run, and writes ``index.html`` (overview and documents list) plus one
page per fully shown document. No server: the site opens from a laptop or an object-store bucket.

Everything from the documents (file names, page text, JSON values, error messages) is data:
the templates autoescape it, Markdown is rendered with raw HTML off, and a Content Security
Policy allows only the site's own script and style files.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from docpipe.config import RenderOptions, StorageOptions
from docpipe.errors import InputError, OutputError, describe
from docpipe.storage import explain, is_remote, join
from docpipe.schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA

ERROR_FIRST = ("error", "partial")  # statuses whose documents get a full view before any sample
STATUS_ORDER = ("ok", "partial", "error", "skipped")
# What the overview and the list need, for every row: no page text, JSON or raw output.
DOCUMENT_LIST_COLUMNS = ["source_uri", "doc_id", "size_bytes", "media_type", "page_count", "status", "error_type",
                         "error_message", "schema_name", "valid", "extraction_finish_reason"]
PAGE_STAT_COLUMNS = ["source_uri", "page_number", "status", "error_type", "error_message", "output_tokens",
                     "finish_reason", "text_source", "renderer", "route_reason"]


class ReportOptions(BaseModel):
    """What the report shows, and how much of it."""

    model_config = ConfigDict(extra="forbid")

    max_documents: int = Field(
        100, ge=0, description="Documents given a full view (page images beside text): those in error or partial "
        "first, then a random sample of the rest (seeded by the run id, so a report can be made again).",
    )
    max_listed: int = Field(10_000, ge=1, description="Documents in the index's list (errors and partials first).")
    image_edge: int = Field(1000, ge=64, description="Longest side of a page image in the report, in pixels.")
    jpeg_quality: int = Field(70, ge=1, le=100, description="JPEG quality of the page images.")
    max_page_images: int = Field(
        50, ge=0, description="Pages per document rendered as images; later pages show their text and status only.",
    )
    page_timeout_s: float = Field(60.0, gt=0, description="Longest time to render one page for the report.")
    document_timeout_s: float = Field(300.0, gt=0, description="Longest time to render one document's images.")


@dataclass
class ReportResult:
    index: str  # where index.html was written
    run_id: str
    documents: dict[str, int]  # by status, as read from the documents table
    pages: dict[str, int]
    full_views: int
    page_images: int
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- reading the run


def _output(uri: str, storage: StorageOptions | None):
    from docpipe.output.store import Output

    try:
        return Output(uri, storage)
    except Exception as exc:
        raise InputError(explain(f"cannot open output {uri}: {describe(exc)}")) from None


def run_ids(out) -> list[str]:
    """Finished runs in OUT (those with a manifest), oldest first: run ids start with their UTC start time."""
    from docpipe.output import tables

    try:
        return tables.run_ids(out)
    except Exception as exc:
        raise InputError(explain(f"cannot list {out.uri}/_runs: {describe(exc)}")) from None


def load_manifest(out, run_id: str | None) -> dict[str, Any]:
    """The manifest of run ``run_id`` (the latest finished run by default)."""
    from docpipe.output.tables import read_manifest

    ids = run_ids(out)
    if not ids:
        raise InputError(f"no finished run in {out.uri}: no _runs/<run_id>.json (is it a docpipe output?)")
    if run_id is None:
        run_id = ids[-1]
    elif run_id not in ids:
        raise InputError(f"no run {run_id} in {out.uri}; latest runs: {', '.join(ids[-5:])}")
    try:
        return read_manifest(out, run_id)
    except Exception as exc:
        raise InputError(explain(f"cannot read the manifest of run {run_id}: {describe(exc)}")) from None


def _read_table(out, manifest: dict[str, Any], table: str, columns: list[str], uris: set[str] | None = None):
    """This run's rows of a table (the files its manifest lists), read with the contract's schema: columns older
    files lack read as null."""
    from docpipe.output.tables import manifest_files, read_table

    try:
        return read_table(out, table, columns, files=manifest_files(out, manifest, table), run_id=manifest["run_id"],
                          uris=uris)
    except Exception as exc:
        raise InputError(explain(f"cannot read {table} of run {manifest['run_id']}: {describe(exc)}")) from None


# ------------------------------------------------------------------------------------------------ what to show


def choose_full_views(documents: list[dict[str, Any]], cap: int, seed: str) -> tuple[list[dict[str, Any]], str]:
    """Documents to show in full: errors and partials first, then a seeded random sample of the others;
    and a sentence saying so."""
    troubled = [d for d in documents if d["status"] in ERROR_FIRST]
    others = [d for d in documents if d["status"] not in ERROR_FIRST]
    chosen = troubled[:cap]
    rnd = random.Random(seed)
    sample = []
    # Skipped documents have no pages in this run: they come last.
    for group in ([d for d in others if d["status"] != "skipped"], [d for d in others if d["status"] == "skipped"]):
        room = cap - len(chosen) - len(sample)
        sample += rnd.sample(group, min(room, len(group))) if room > 0 else []
    chosen += sample
    if len(chosen) == len(documents):
        note = f"Every document ({len(documents)}) has a full view."
    else:
        note = (f"Full views for {len(chosen)} of {len(documents)} documents (the cap is {cap}): "
                f"{min(len(troubled), cap)} of {len(troubled)} in error or partial, then a random sample of "
                f"{len(sample)} of the {len(others)} others.")
    return sorted(chosen, key=lambda d: d["source_uri"]), note


def _markdown():
    from markdown_it import MarkdownIt

    # Raw HTML off: page text that is HTML shows as text. Images off: a page's text must not fetch anything.
    return MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table").disable("image")


def json_tree(value: Any, errors: list[str]) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
    """The extraction as a tree of nodes for the template, each validation error placed at the deepest node
    its path names; errors naming no part of the JSON (the output as a whole, a failed chunk) come back apart.

    Errors are 'path: message' with dotted paths (line_items.0.amount), as docpipe.extract.stage writes them."""
    def build(v: Any, path: tuple[str, ...], key: str | None) -> dict[str, Any]:
        node = {"key": key, "path": ".".join(path), "errors": []}
        if isinstance(v, dict):
            node.update(kind="object", children=[build(c, path + (str(k),), str(k)) for k, c in v.items()])
        elif isinstance(v, list):
            node.update(kind="array", children=[build(c, path + (str(i),), str(i)) for i, c in enumerate(v)])
        else:
            node.update(kind="null" if v is None else type(v).__name__, text=json.dumps(v, ensure_ascii=False))
        return node

    root = build(value, (), None) if value is not None else None
    index: dict[tuple[str, ...], dict[str, Any]] = {}

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        index[path] = node
        for child in node.get("children", []):
            walk(child, path + (child["key"],))

    if root is not None:
        walk(root, ())
    apart = []
    for error in errors:
        where, sep, message = error.partition(": ")
        if not sep:
            where, message = "", error
        parts = tuple(where.split(".")) if where and where != "<root>" else ()
        if root is None or where.startswith("<output>") or where.startswith("chunk "):
            apart.append({"where": where, "message": message})
            continue
        depth = len(parts)
        while depth and parts[:depth] not in index:
            depth -= 1
        target = index[parts[:depth]]
        target["errors"].append({"where": where or "<root>", "message": message,
                                 "exact": depth == len(parts)})
    return root, apart


def summarize(manifest: dict[str, Any], documents: list[dict[str, Any]], page_rows: list[dict[str, Any]]
              ) -> dict[str, Any]:
    """The overview's figures, counted from the rows themselves (and checked against the manifest)."""
    doc_counts = Counter(d["status"] for d in documents)
    page_counts = Counter(p["status"] for p in page_rows)

    def ordered(counts: Counter) -> list[tuple[str, int]]:
        keys = [k for k in STATUS_ORDER if k in counts] + sorted(k for k in counts if k not in STATUS_ORDER)
        return [(k, counts[k]) for k in keys]

    def errors_of(rows) -> list[dict[str, Any]]:
        by_type: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r["error_type"]:
                e = by_type.setdefault(r["error_type"], {"type": r["error_type"], "count": 0, "example": None,
                                                         "source_uri": r["source_uri"]})
                e["count"] += 1
                e["example"] = e["example"] or r["error_message"]
        return sorted(by_type.values(), key=lambda e: (-e["count"], e["type"]))

    mismatch = []
    for name, counted in (("documents", doc_counts), ("pages", page_counts)):
        recorded = {k: v for k, v in manifest.get(name, {}).items() if k != "total"}
        if recorded != dict(counted):
            mismatch.append(f"{name}: the manifest says {recorded}, the {name} table has {dict(counted)}")
    ok_pages = [p for p in page_rows if p["status"] == "ok"]
    # Older outputs (contract < 3) have no text_source; runs without OCR (task extract) leave page text empty.
    no_text = "no page text (task extract)" if "ocr" not in manifest.get("config", {}).get("task", "ocr") else \
        "not recorded (output older than contract v3)"
    sources = Counter(p["text_source"] or no_text for p in ok_pages)
    # Why the model read a page (contract 4 on): what a user asks of the GPU time a run cost.
    why_model = Counter(p["route_reason"] or "not recorded (output older than contract v4)"
                        for p in ok_pages if p["text_source"] == "model")
    tokens = [p["output_tokens"] for p in page_rows if p["output_tokens"] is not None]
    extraction = [d for d in documents if d.get("schema_name")]
    return {
        "documents": ordered(doc_counts),
        "documents_total": len(documents),
        "pages": ordered(page_counts),
        "pages_total": len(page_rows),
        "document_errors": errors_of(documents),
        "page_errors": errors_of(page_rows),
        "text_sources": sources.most_common(),
        "model_reasons": why_model.most_common(),
        "renderers": Counter(p["renderer"] or "not recorded" for p in page_rows if p["status"] == "ok").most_common(),
        "finish_reasons": Counter(p["finish_reason"] for p in page_rows if p["finish_reason"]).most_common(),
        "tokens": tokens,
        "tokens_max": max(tokens) if tokens else None,
        "tokens_mean": sum(tokens) / len(tokens) if tokens else None,
        "extraction": {
            "documents": len(extraction),
            "valid": sum(1 for d in extraction if d["valid"]),
            "invalid": sum(1 for d in extraction if d["valid"] is False),
            "finish_reasons": Counter(d["extraction_finish_reason"] for d in extraction
                                      if d["extraction_finish_reason"]).most_common(),
        } if extraction else None,
        "mismatch": mismatch,
    }


def main_options(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The options a reader wants beside the figures (absent keys in older manifests are left out)."""
    config = manifest.get("config", {})
    model, render, extract = config.get("model", {}), config.get("render", {}), config.get("extract", {})
    task = config.get("task", "ocr")
    rows = [
        ("task", task),
        ("model", model.get("name")),
        ("adapter", model.get("adapter")),
        ("max_new_tokens (per page)", model.get("max_new_tokens")),
        ("batch size", model.get("batch_size")),
        ("image splitting", model.get("do_image_splitting")),
        ("dtype / attention", f"{model.get('dtype')} / {model.get('attention')}" if model else None),
        ("render longest edge", render.get("longest_edge") or "from the processor"),
        ("page image format", render.get("image_format")),
        ("model actors", config.get("num_actors") or "default"),
        ("inputs", " ".join(config.get("inputs", []) + config.get("manifests", []))),
    ]
    if "extract" in task:
        rows += [("schema", extract.get("schema_spec")), ("pages per extraction prompt", extract.get("page_cap")),
                 ("max_new_tokens (per extraction)", extract.get("max_new_tokens"))]
    return [(k, str(v)) for k, v in rows if v not in (None, "", [])]


# ------------------------------------------------------------------------------------------------------ plots


def _svg(fig) -> bytes:
    import io

    buf = io.BytesIO()
    # No date and a fixed id salt: the same run gives the same files.
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buf.getvalue()


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.rcParams["svg.hashsalt"] = "docpipe"
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: smaller files, selectable labels
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    return Figure(figsize=(width, height), dpi=100)


COLORS = {"ok": "#2e7d32", "partial": "#ef6c00", "error": "#c62828", "skipped": "#78909c"}


def plot_status(summary: dict[str, Any]) -> bytes:
    fig = _figure(7, 2.4)
    for i, (name, counts) in enumerate((("documents", summary["documents"]), ("pages", summary["pages"]))):
        ax = fig.add_subplot(1, 2, i + 1)
        labels = [k for k, _ in counts] or ["none"]
        values = [v for _, v in counts] or [0]
        bars = ax.barh(labels, values, color=[COLORS.get(k, "#546e7a") for k in labels])
        ax.bar_label(bars, padding=3)
        ax.invert_yaxis()
        ax.set_title(f"{name} by status")
        ax.set_xlim(0, max(values) * 1.25 or 1)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _svg(fig)


def plot_tokens(tokens: list[int], cap: int | None) -> bytes:
    fig = _figure(7, 2.6)
    ax = fig.add_subplot()
    top = max(tokens + [cap or 0])
    bins = min(50, max(1, top))
    ax.hist(tokens, bins=bins, range=(0, top + 1), color="#1565c0")
    if cap:
        ax.axvline(cap, color="#c62828", linestyle="--")
        ax.annotate(f"max_new_tokens = {cap}", xy=(cap, 1), xycoords=("data", "axes fraction"),
                    xytext=(-4, -4), textcoords="offset points", ha="right", va="top", color="#c62828")
    ax.set_xlabel("output tokens per page")
    ax.set_ylabel("pages")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _svg(fig)


def rate_points(out, manifest: dict[str, Any]) -> list[tuple[float, int]]:
    """(seconds since the run started, pages written by then) at each sealed pages file of the run.

    Pages carry no timestamps; the files do: a run seals its files at every checkpoint, so a long run
    leaves one point per checkpoint_s. Empty files (no rows) are left out."""
    from docpipe.output.tables import file_rows, manifest_files

    try:
        start = datetime.strptime(manifest["started_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        points = []
        for path in manifest_files(out, manifest, "pages"):
            rows, mtime = file_rows(out, path)
            if rows and mtime is not None:
                points.append(((mtime - start).total_seconds(), rows))
    except Exception:  # a figure is not worth failing the report for
        return []
    points.sort()
    cumulative, total = [], 0
    for t, rows in points:
        total += rows
        cumulative.append((max(t, 0.0), total))
    return cumulative


def plot_rate(points: list[tuple[float, int]], average: float | None) -> bytes:
    fig = _figure(7, 2.4)
    ax = fig.add_subplot()
    xs, rates, prev_t, prev_n = [], [], 0.0, 0
    for t, n in points:
        if t > prev_t:
            xs += [prev_t, t]
            rates += [(n - prev_n) / (t - prev_t)] * 2
        prev_t, prev_n = t, n
    ax.plot(xs, rates, color="#1565c0", label="pages/s between checkpoints")
    if average:
        ax.axhline(average, color="#546e7a", linestyle=":", label=f"run average {average:.2f}")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("pages/s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _svg(fig)


# ------------------------------------------------------------------------------------------------ page images


def render_images(source_uri: str, doc_id: str | None, storage: StorageOptions | None,
                  options: ReportOptions) -> tuple[dict[int, bytes], dict[int, str], list[str]]:
    """JPEG images of a document's first pages, rendered afresh by the run's own render stage (in its render
    process, under time limits); messages for pages that did not render; notes about the document."""
    from docpipe.render.isolated import expand_document_isolated
    from docpipe.records import DOCUMENT, PAGE

    opts = RenderOptions(image_format="jpeg", jpeg_quality=options.jpeg_quality,
                         page_timeout_s=options.page_timeout_s, document_timeout_s=options.document_timeout_s)
    images: dict[int, bytes] = {}
    failed: dict[int, str] = {}
    notes: list[str] = []
    records = expand_document_isolated(source_uri, opts, options.image_edge, storage)
    try:
        for rec in records:
            if rec["kind"] == DOCUMENT:
                if rec["status"] == "error":
                    notes.append(f"The page images could not be made: {rec['error_type']}: {rec['error_message']}")
                elif doc_id and rec.get("doc_id") and rec["doc_id"] != doc_id:
                    notes.append("The source has changed since this run (its bytes differ): the images show it as "
                                 "it is now.")
            elif rec["kind"] == PAGE:
                if rec["page_number"] > options.max_page_images:
                    notes.append(f"Images for the first {options.max_page_images} pages only (--max-page-images).")
                    break
                if rec["status"] == "ok":
                    images[rec["page_number"]] = rec["image"]
                else:
                    failed[rec["page_number"]] = f"{rec['error_type']}: {rec['error_message']}"
    finally:
        records.close()  # stops the render process if it was left mid-document
    return images, failed, notes


# ------------------------------------------------------------------------------------------------------ writing


class Site:
    """The report's folder, local or in object storage; files are written whole (see sink.Output)."""

    def __init__(self, uri: str, storage: StorageOptions | None):
        from docpipe.output.store import Output

        self.out = Output(uri, storage)
        self.made: set[str] = set()

    def write(self, rel: str, data: bytes | str) -> None:
        import os

        folder = os.path.dirname(rel)
        if self.out.rename and folder not in self.made:  # a local folder must exist; object stores have none
            self.out.fs.create_dir(self.out.path(folder), recursive=True)
            self.made.add(folder)
        self.out.write_bytes(rel, data.encode() if isinstance(data, str) else data)


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("docpipe.tools", "templates"), undefined=StrictUndefined,
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["basename"] = lambda uri: uri.rstrip("/").rsplit("/", 1)[-1] or uri
    env.filters["size"] = _human_size
    return env


def _human_size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _asset(name: str) -> bytes:
    from importlib.resources import files

    return files("docpipe.tools").joinpath("templates", name).read_bytes()


def write_report(output_uri: str, run_id: str | None = None, site_uri: str | None = None,
                 storage: StorageOptions | None = None, options: ReportOptions | None = None,
                 log=None) -> ReportResult:
    """Write the report of one run of ``output_uri`` (the latest by default) to ``site_uri`` (default
    OUT/_reports/<run_id>)."""
    options = options or ReportOptions()
    log = log or (lambda message: None)
    out = _output(output_uri, storage)
    manifest = load_manifest(out, run_id)
    run_id = manifest["run_id"]
    site_uri = site_uri or join(out.uri, "_reports", run_id)
    try:
        site = Site(site_uri, storage)
    except Exception as exc:
        raise OutputError(explain(f"cannot write the report to {site_uri}: {describe(exc)}")) from None

    documents = _read_table(out, manifest, "documents", DOCUMENT_LIST_COLUMNS).to_pylist()
    documents.sort(key=lambda d: d["source_uri"])
    pages = _read_table(out, manifest, "pages", PAGE_STAT_COLUMNS).to_pylist()  # no text: small even for big runs
    summary = summarize(manifest, documents, pages)
    failed_pages = Counter(p["source_uri"] for p in pages if p["status"] != "ok")

    chosen, views_note = choose_full_views(documents, options.max_documents, run_id)
    view_of = {d["source_uri"]: f"docs/{i + 1:05d}.html" for i, d in enumerate(chosen)}
    listed = sorted(documents, key=lambda d: (d["status"] not in ERROR_FIRST, d["source_uri"]))[: options.max_listed]
    list_note = (f"The list shows {len(listed)} of {len(documents)} documents (errors and partials first; "
                 f"the cap is {options.max_listed})." if len(listed) < len(documents) else "")
    config = manifest.get("config", {})
    cap = config.get("model", {}).get("max_new_tokens")

    env = _environment()
    write = _writer(site)
    plots, plot_notes = [], []
    write("plots/status.svg", plot_status(summary))
    plots.append(("plots/status.svg", "Documents and pages by status"))
    if summary["tokens"]:
        write("plots/tokens.svg", plot_tokens(summary["tokens"], cap))
        plots.append(("plots/tokens.svg", f"Output tokens per page; the dashed line is max_new_tokens ({cap})"))
    else:
        plot_notes.append("No output tokens per page were recorded (no page went through the OCR model).")
    timings = manifest.get("timings", {})
    points = rate_points(out, manifest)
    if len(points) >= 2:
        write("plots/rate.svg", plot_rate(points, timings.get("pages_per_s")))
        plots.append(("plots/rate.svg", "Pages per second over the run, between the run's checkpoints"))
    else:
        plot_notes.append(f"Pages per second over the run: pages carry no timestamps and the run sealed "
                          f"{len(points)} non-empty pages file(s); a curve needs at least 2 (one per checkpoint, "
                          f"every checkpoint_s = {config.get('checkpoint_s', '?')} s). The run's average is above.")

    # Document views: pages rendered afresh beside what the run recorded for them. Only these documents' text,
    # JSON and raw output are read.
    image_count = 0
    page_rows = defaultdict(list)
    if chosen:
        uris = {d["source_uri"] for d in chosen}
        for p in _read_table(out, manifest, "pages", PAGES_SCHEMA.names, uris).to_pylist():
            page_rows[p["source_uri"]].append(p)
        full = {d["source_uri"]: d for d in _read_table(out, manifest, "documents", DOCUMENTS_SCHEMA.names,
                                                        uris).to_pylist()}
        chosen = [full[d["source_uri"]] for d in chosen]
    md = _markdown()
    template = env.get_template("document.html")
    for n, doc in enumerate(chosen, 1):
        log(f"rendering document {n}/{len(chosen)}: {doc['source_uri']}")
        rows = sorted(page_rows[doc["source_uri"]], key=lambda p: p["page_number"])
        images, failed, notes = {}, {}, []
        if rows:
            images, failed, notes = render_images(doc["source_uri"], doc["doc_id"], storage, options)
        folder = f"docs/{n:05d}"
        shown = []
        for p in rows:
            image = images.get(p["page_number"])
            if image is not None:
                write(f"{folder}/p{p['page_number']:05d}.jpg", image)
                image_count += 1
            shown.append(p | {
                "image": f"{n:05d}/p{p['page_number']:05d}.jpg" if image is not None else None,
                "image_note": failed.get(p["page_number"]) or ("not rendered for the report"
                                                              if p["page_number"] > options.max_page_images else None),
                "html": md.render(p["text"]) if p["text"] else "",
                "blocks": p.get("blocks") or [],  # drawn over the image: boxes are fractions of the page
            })
        extraction = None
        if doc.get("schema_name"):
            value = json.loads(doc["extraction"]) if doc.get("extraction") else None
            tree, apart = json_tree(value, doc.get("validation_errors") or [])
            extraction = {"tree": tree, "apart": apart}
        html = template.render(root="../", doc=doc, pages=shown, notes=notes, extraction=extraction, run_id=run_id,
                               position=n, count=len(chosen), failed_pages=failed_pages.get(doc["source_uri"], 0),
                               markup=_markup)
        write(view_of[doc["source_uri"]], html)

    write("assets/report.css", _asset("report.css"))
    write("assets/report.js", _asset("report.js"))
    index = env.get_template("index.html").render(
        root="", run_id=run_id,
        manifest=manifest, summary=summary, options=main_options(manifest), plots=plots, plot_notes=plot_notes,
        listed=listed, list_note=list_note, views_note=views_note, view_of=view_of, failed_pages=failed_pages,
        timings=timings, counters=manifest.get("counters", {}), max_documents=options.max_documents,
        statuses=[k for k, _ in summary["documents"]],
        error_types=sorted({d["error_type"] for d in documents if d["error_type"]}),
    )
    write("index.html", index)
    return ReportResult(
        index=join(site.out.uri, "index.html") if is_remote(site.out.uri) else f"{site.out.uri}/index.html",
        run_id=run_id, documents=dict(summary["documents"]), pages=dict(summary["pages"]),
        full_views=len(chosen), page_images=image_count, notes=summary["mismatch"],
    )


def _markup(html: str):
    """Mark HTML that markdown-it produced (with raw HTML off, so every text in it is escaped) as safe."""
    from markupsafe import Markup

    return Markup(html)


def _writer(site: Site):
    def write(rel: str, data: bytes | str) -> None:
        try:
            site.write(rel, data)
        except Exception as exc:
            raise OutputError(explain(f"cannot write the report to {site.out.uri}: {describe(exc)}")) from None

    return write
