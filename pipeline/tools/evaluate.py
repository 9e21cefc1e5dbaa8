"""``docpipe eval``: score an output folder's page text and extractions against references.

References come from a labels file (``--labels``) or, label-free, from the documents' own text layers
(``--against text-layer``: model-read pages of born-digital PDFs, scored against the layer the routing rules
would trust, as the Markdown the render stage would write for it; pages already answered by their text layer or
blank are not counted). Against the text layer, both sides are first stripped of Markdown's markup
(``markdown_words``: heading marks, table pipes and rule rows, HTML tags, emphasis, LaTeX delimiters), so a page
scores by what it says, not by how a table was drawn.

Page text. Both sides are normalised (Unicode NFKC, every run of whitespace one space, ends trimmed; case and
punctuation kept). CER = character edits / reference characters; WER = word edits / reference words, words
being the whitespace-separated tokens; edits are Levenshtein distances (rapidfuzz). The overall rates divide
the summed edits by the summed reference lengths, so long pages weigh more. A labelled page with no ok row in
the output scores as empty text (every reference character deleted) and is counted in ``pages_missing``. The
output's latest row for each page counts (runs are ordered by run id).

Extraction. Each labelled document's JSON object is flattened to leaf fields (``a.b``, list items
``items[0].price``); each is an exact match after normalisation, or not; fields the model adds beyond the
labels are not scored. Normalisation: strings NFKC, whitespace collapsed, trimmed, case-folded; numbers, and
strings that read as one (``1,234.50``, ``$12``, ``-3``), compare as decimals; dates in ISO (2024-03-05),
``5 March 2024``, ``March 5, 2024`` or dotted day-first (05.03.2024) compare as ISO dates (slashed dates are
ambiguous and stay strings); null matches null or a missing field.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from docpipe.errors import ConfigError, InputError

LABEL_FORMATS = (".parquet", ".jsonl", ".csv")
DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%d %B %Y", "%d %b %Y", "%B %d, %Y", "%b %d, %Y", "%B %d %Y",
                "%b %d %Y", "%d.%m.%Y")
NUMBER = re.compile(r"^([+-]?)[$€£]?\s*(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?$")


def normalise_text(text: str | None) -> str:
    return " ".join(unicodedata.normalize("NFKC", text or "").split())


def edits(reference: str | None, hypothesis: str | None) -> dict[str, Any]:
    """Character and word edits of one page, with the reference's lengths and the rates (null for an empty
    reference, whose edits still count in the overall rates)."""
    from rapidfuzz.distance import Levenshtein

    ref, hyp = normalise_text(reference), normalise_text(hypothesis)
    ref_words, hyp_words = ref.split(), hyp.split()
    scores = {"ref_chars": len(ref), "char_edits": Levenshtein.distance(ref, hyp),
              "ref_words": len(ref_words), "word_edits": Levenshtein.distance(ref_words, hyp_words)}
    scores["cer"] = scores["char_edits"] / scores["ref_chars"] if scores["ref_chars"] else None
    scores["wer"] = scores["word_edits"] / scores["ref_words"] if scores["ref_words"] else None
    return scores


def overall(pages: list[dict[str, Any]]) -> dict[str, Any]:
    chars, words = sum(p["ref_chars"] for p in pages), sum(p["ref_words"] for p in pages)
    return {"cer": sum(p["char_edits"] for p in pages) / chars if chars else None,
            "wer": sum(p["word_edits"] for p in pages) / words if words else None,
            "pages_scored": len(pages)}


def normalise_value(value: Any) -> Any:
    """A field's value for exact match (see the module docstring)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return Decimal(repr(value)).normalize()
    if not isinstance(value, str):
        return json.dumps(value, sort_keys=True)  # an empty list or object as a leaf
    text = normalise_text(value)
    number = NUMBER.match(text)
    if number:
        sign, whole, frac = number.groups()
        try:
            return Decimal(sign + whole.replace(",", "") + (frac or "")).normalize()
        except InvalidOperation:
            pass
    for fmt in DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt).date().isoformat()
        except ValueError:
            continue
    return text.casefold()


def flatten(value: Any, path: str = "") -> dict[str, Any]:
    """Leaf fields of a JSON value by path: ``a.b``, ``items[0].price``."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{path}.{key}" if path else key).items()}
    if isinstance(value, list) and value:
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{path}[{i}]").items()}
    return {path: value}


def field_matches(expected: dict[str, Any], predicted: dict[str, Any] | None) -> dict[str, bool]:
    got = flatten(predicted or {})
    return {path: normalise_value(value) == normalise_value(got.get(path)) for path, value in flatten(expected).items()}


# --- reading labels and outputs ---------------------------------------------------------------------------


def read_labels(path: str) -> list[dict[str, Any]]:
    """Label rows from Parquet, JSONL or CSV: a key (source_uri or doc_id), then page_number and text for a page,
    or extraction (a JSON object, or its text) for a document."""
    if not path.endswith(LABEL_FORMATS):
        raise ConfigError(f"labels file must be one of {', '.join(LABEL_FORMATS)}: {path}")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        else:
            import csv

            with open(path, newline="", encoding="utf-8") as f:
                rows = [{k: (v if v != "" or k == "text" else None) for k, v in r.items()} for r in csv.DictReader(f)]
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read labels {path}: {type(exc).__name__}: {exc}") from None
    for n, row in enumerate(rows, 1):
        if not (row.get("source_uri") or row.get("doc_id")):
            raise InputError(f"labels {path}, row {n}: needs source_uri or doc_id")
        if row.get("page_number") is not None:
            row["page_number"] = int(row["page_number"])
        elif row.get("extraction") is not None:
            if isinstance(row["extraction"], str):
                try:
                    row["extraction"] = json.loads(row["extraction"])
                except ValueError as exc:
                    raise InputError(f"labels {path}, row {n}: extraction is not JSON: {exc}") from None
            if not isinstance(row["extraction"], dict):
                raise InputError(f"labels {path}, row {n}: extraction must be a JSON object")
        else:
            raise InputError(f"labels {path}, row {n}: needs page_number and text, or extraction")
    return rows


@dataclass
class OutputRows:
    pages: dict[tuple[str, int], dict[str, Any]]  # by (source_uri, page) and (doc_id, page): the latest row
    documents: dict[str, dict[str, Any]]  # by source_uri and doc_id: the latest row that was not skipped


def read_output(out) -> OutputRows:
    """The latest page and document rows of every sealed file in OUT (any contract version)."""
    from docpipe.output.tables import read_rows

    pages: dict[tuple[str, int], dict[str, Any]] = {}
    for row in read_rows(out, "pages", ["source_uri", "doc_id", "page_number", "status", "text", "text_source",
                                        "renderer", "run_id"]):  # oldest run first: the latest row stays
        pages[(row["source_uri"], row["page_number"])] = pages[(row["doc_id"], row["page_number"])] = row
    documents: dict[str, dict[str, Any]] = {}
    for row in read_rows(out, "documents", ["source_uri", "doc_id", "status", "extraction", "run_id"]):
        if row["status"] != "skipped":
            documents[row["source_uri"]] = row
            if row["doc_id"]:
                documents[row["doc_id"]] = row
    if not pages and not documents:
        raise InputError(f"no docpipe results in {out.uri} (no sealed pages/ or documents/ files)")
    return OutputRows(pages, documents)


# --- scoring ---------------------------------------------------------------------------------------------


def score_labels(rows: OutputRows, labels: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Summary and per-page scores of an output against a labels file."""
    per_page, fields = [], []
    for label in labels:
        key = label.get("source_uri") or label.get("doc_id")
        if label.get("page_number") is not None:
            row = rows.pages.get((key, label["page_number"]))
            ok = row is not None and row["status"] == "ok"
            per_page.append({"source_uri": row["source_uri"] if row else label.get("source_uri"),
                             "doc_id": row["doc_id"] if row else label.get("doc_id"),
                             "page_number": label["page_number"], "status": row["status"] if row else None,
                             "text_source": row["text_source"] if row else None, "missing": not ok,
                             **edits(label.get("text"), row["text"] if ok else None)})
        else:
            doc = rows.documents.get(key)
            predicted = json.loads(doc["extraction"]) if doc and doc["extraction"] else None
            fields.append(field_matches(label["extraction"], predicted if isinstance(predicted, dict) else None))
    return summarise(per_page, fields), per_page


def score_against_text_layer(rows: OutputRows, storage=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Model-read pages of PDFs whose text layer the routing rules trust, scored against that layer."""
    from docpipe.config import RouteOptions
    from docpipe.render.open import PDF
    from docpipe.render.document import sniff_media_type
    from docpipe.render.route import ConversionError, pymupdf_text_layer, trust_text_layer
    from docpipe.render.text_layer import RunningLines, clean_text
    from docpipe.storage import read_bytes

    import pymupdf

    rules = RouteOptions(text_layer="auto")
    latest = {(r["source_uri"], r["page_number"]): r for r in rows.pages.values()}
    by_doc: dict[str, list[dict[str, Any]]] = defaultdict(list)
    skipped = {"not_from_model": 0, "no_trusted_text_layer": 0, "unreadable_source": 0, "unreadable_text_layer": 0}
    for row in latest.values():
        if row["status"] == "ok" and row["text_source"] == "model":
            by_doc[row["source_uri"]].append(row)
        else:
            skipped["not_from_model"] += 1
    per_page = []
    for uri, pages in sorted(by_doc.items()):
        try:
            data = read_bytes(uri, storage)
            pdf = pymupdf.open(stream=data, filetype="pdf") if sniff_media_type(data) == PDF else None
            running = RunningLines(pdf) if pdf else None  # running heads found as the render stage finds them
        except Exception:  # moved, deleted or unreadable since the run: nothing to score against
            skipped["unreadable_source"] += len(pages)
            continue
        pdfium_doc = None
        for row in sorted(pages, key=lambda r: r["page_number"]):
            index = row["page_number"] - 1
            try:
                if pdf is None:
                    layer = None
                elif row.get("renderer") == "pdfium" or pdf.needs_pass:
                    # The engine that drew the page reads its layer: MuPDF refuses these documents or pages.
                    from docpipe.render.pdfium import PdfiumPage, open_pdfium

                    pdfium_doc = pdfium_doc or open_pdfium(data)
                    layer = PdfiumPage(pdfium_doc, index).text_layer()
                else:
                    layer = pymupdf_text_layer(pdf.load_page(index), running)
            except Exception:  # neither engine can read this page's layer: counted, not scored
                skipped["unreadable_text_layer"] += 1
                continue
            if not trust_text_layer(layer, rules).trusted:
                skipped["no_trusted_text_layer"] += 1
                continue
            try:
                reference = clean_text(layer.page_text())
            except ConversionError:  # the converter failed on this page: nothing to score against
                skipped["unreadable_text_layer"] += 1
                continue
            per_page.append({"source_uri": uri, "doc_id": row["doc_id"], "page_number": row["page_number"],
                             "status": row["status"], "text_source": row["text_source"], "missing": False,
                             **edits(markdown_words(reference), markdown_words(row["text"]))})
    summary = summarise(per_page, [])
    summary["pages_not_scored"] = skipped
    return summary, per_page


def markdown_words(text: str | None) -> str:
    """Markdown's text without its markup (see the module docstring); whitespace is left to ``edits``."""
    import html

    text = re.sub(r"<[^>]+>", " ", text or "")
    text = re.sub(r"^\s*\|?(\s*:?-{3,}:?\s*\|)+\s*:?-{0,}:?\s*$", " ", text, flags=re.M)  # a table's rule row
    text = re.sub(r"^\s{0,3}#{1,6}\s+", "", text, flags=re.M)
    text = re.sub(r"(?<!\\)\||\*\*|__|\\[()\[\]]", " ", text)
    return html.unescape(text)


def summarise(per_page: list[dict[str, Any]], fields: list[dict[str, bool]]) -> dict[str, Any]:
    summary = overall(per_page) | {"pages_missing": sum(p["missing"] for p in per_page)}
    by_source = defaultdict(list)
    for p in per_page:
        by_source[p["text_source"] or "none"].append(p)
    summary["by_text_source"] = {k: overall(v) for k, v in sorted(by_source.items())}
    matches = [m for doc in fields for m in doc.values()]
    by_field: dict[str, list[bool]] = defaultdict(list)
    for doc in fields:
        for path, hit in doc.items():
            by_field[re.sub(r"\[\d+\]", "[]", path)].append(hit)
    summary.update(field_accuracy=sum(matches) / len(matches) if matches else None, documents_scored=len(fields),
                   fields_scored=len(matches), fields={k: sum(v) / len(v) for k, v in sorted(by_field.items())})
    return summary


SCORES_COLUMNS = ("source_uri", "doc_id", "page_number", "status", "text_source", "missing", "ref_chars",
                  "char_edits", "cer", "ref_words", "word_edits", "wer")


def write_scores(per_page: list[dict[str, Any]], out, path: str | None) -> str:
    """The per-page scores as Parquet: at ``path``, or OUT/_eval/page-scores-<UTC time>.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("source_uri", pa.string()), ("doc_id", pa.string()), ("page_number", pa.int32()),
                        ("status", pa.string()), ("text_source", pa.string()), ("missing", pa.bool_()),
                        ("ref_chars", pa.int64()), ("char_edits", pa.int64()), ("cer", pa.float64()),
                        ("ref_words", pa.int64()), ("word_edits", pa.int64()), ("wer", pa.float64())])
    table = pa.Table.from_pylist([{k: p.get(k) for k in SCORES_COLUMNS} for p in per_page], schema=schema)
    if path:
        pq.write_table(table, path)
        return path
    rel = f"_eval/page-scores-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.parquet"
    if out.rename:  # a local folder must exist; object stores have none to make
        out.fs.create_dir(out.path("_eval"), recursive=True)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    out.write_bytes(rel, sink.getvalue().to_pybytes())
    return out.path(rel)


def evaluate(output: str, labels: str | None = None, against: str | None = None, scores: str | None = None,
             storage=None) -> dict[str, Any]:
    """Score OUT; returns the summary (with ``scores_file``), as --json writes it."""
    from docpipe.output.store import Output

    out = Output(output, storage)
    rows = read_output(out)
    if labels:
        summary, per_page = score_labels(rows, read_labels(labels))
        summary["reference"] = f"labels {labels}"
    elif against == "text-layer":
        summary, per_page = score_against_text_layer(rows, storage)
        summary["reference"] = "text-layer"
    else:
        raise ConfigError("give --labels FILE or --against text-layer")
    summary["scores_file"] = write_scores(per_page, out, scores)
    return summary


def print_report(summary: dict[str, Any], file=None) -> None:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f} %"

    print(f"reference  {summary['reference']}", file=file)
    print(f"pages      {summary['pages_scored']} scored, {summary['pages_missing']} missing from the output",
          file=file)
    if summary.get("pages_not_scored"):
        print("not scored " + ", ".join(f"{k} {v}" for k, v in summary["pages_not_scored"].items()), file=file)
    print(f"CER        {pct(summary['cer'])}", file=file)
    print(f"WER        {pct(summary['wer'])}", file=file)
    for source, s in summary["by_text_source"].items():
        print(f"  {source:<12} {s['pages_scored']:>6} pages  CER {pct(s['cer']):>9}  WER {pct(s['wer']):>9}", file=file)
    if summary["documents_scored"]:
        print(f"fields     {summary['fields_scored']} in {summary['documents_scored']} documents, accuracy "
              f"{pct(summary['field_accuracy'])}", file=file)
        for path, acc in summary["fields"].items():
            print(f"  {path:<30} {pct(acc):>9}", file=file)
    print(f"scores     {summary['scores_file']}", file=file)
