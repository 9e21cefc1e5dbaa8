"""Markdown files, one per document, for the many tools that read Markdown: written beside the Parquet as a run
finishes each document (``run --markdown DIR``), from an existing output (``docpipe export OUT --markdown DIR``),
or to stdout (``docpipe convert``).

A document's Markdown is its pages' text in page order, each page opened by ``<!-- page N -->``. HTML comments
render as nothing, and docling users know the form (its ``<!-- page break -->``). A page that failed is marked
``<!-- page N: error TYPE: message -->``, and a document that could not be read at all holds one
``<!-- document: error TYPE: message -->`` line: never an empty page or file that passes for a blank one.

File names are the documents' paths relative to a base folder (``run``: the folder holding every INPUT; ``export``:
the one holding every document of OUT), with ``.md`` added (``scans/2026/a.pdf`` -> ``DIR/2026/a.pdf.md``), so
a.pdf and a.png don't meet. Each part of the path is made safe (no ``..``, no separators or control characters,
at most 200 bytes); where two documents would still get one name (case apart, or after that cleaning), the later
gets its own: ``-`` and 8 hex digits of its URI's SHA-256 before ``.md``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from docpipe.config import StorageOptions
from docpipe.errors import OutputError, describe
from docpipe.output.store import Output
from docpipe.storage import explain, has_magic, is_remote, scheme_of, strip_scheme

_UNSAFE = re.compile(r'[\x00-\x1f\x7f\\/:*?"<>|]')  # separators, control characters, and what Windows refuses
MAX_PART_BYTES = 200


def document_markdown(doc: dict[str, Any], pages: Iterable[dict[str, Any]]) -> str:
    """A document's Markdown from its documents row and its pages rows (or records): see the module's docstring."""
    pages = sorted(pages, key=lambda p: p["page_number"])
    if not pages and doc.get("status") == "error":
        return f"<!-- document: {_failure(doc)} -->\n"
    parts = []
    for page in pages:
        number = page["page_number"]
        if page.get("status") != "ok":
            parts.append(f"<!-- page {number}: {_failure(page)} -->\n")
        else:
            text = (page.get("text") or "").strip()
            parts.append(f"<!-- page {number} -->\n\n{text}\n" if text else f"<!-- page {number} -->\n")
    return "\n".join(parts)


def _failure(row: dict[str, Any]) -> str:
    """'error TYPE: message' on one line, safe inside an HTML comment."""
    message = " ".join(str(row.get("error_message") or "").split())
    message = re.sub(r"<!--|--!?>", lambda m: m[0].replace("--", "- -"), message)  # what would open or end it
    return f"{row.get('status') or 'error'} {row.get('error_type') or 'unknown'}: {message}".rstrip(": ")


def _segments(uri: str) -> list[str]:
    """A document's location as path parts: a local path's (from its root), or the scheme, bucket and key's."""
    if is_remote(uri):
        return [scheme_of(uri), *strip_scheme(uri).split("/")]
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return [p for p in os.path.abspath(path).split(os.sep) if p]


def input_folder(arg: str, listed: set[str]) -> list[str]:
    """The folder an INPUT argument stands for, as path parts: a folder or prefix itself, a file's folder, a glob's
    fixed leading folders. ``listed``: the run's document URIs (a remote argument that is one of them is a file)."""
    parts = _segments(arg)
    if has_magic(arg):
        first = next(i for i, part in enumerate(parts) if has_magic(part))
        return parts[:first]
    if is_remote(arg):
        return parts[:-1] if arg in listed else [p for p in parts if p]
    return parts if os.path.isdir(arg[len("file://"):] if arg.startswith("file://") else arg) else parts[:-1]


def common_folder(folders: Iterable[list[str]]) -> list[str]:
    """The deepest folder (as path parts) holding all of ``folders``."""
    common: list[str] | None = None
    for parts in folders:
        if common is None:
            common = list(parts)
            continue
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        del common[n:]
    return common or []


def _safe(part: str) -> str:
    part = _UNSAFE.sub("_", part)
    if part in ("", ".", ".."):
        return "_"
    if len(part.encode()) > MAX_PART_BYTES:  # file systems cap a name at 255 bytes; room for the suffixes
        digest = hashlib.sha256(part.encode()).hexdigest()[:8]
        part = part.encode()[: MAX_PART_BYTES - 9].decode(errors="ignore") + "-" + digest
    return part


@dataclass
class MarkdownNames:
    """File names under DIR for documents: relative to ``base`` (path parts), made safe, never two alike."""

    base: list[str]
    taken: dict[str, str] = field(default_factory=dict)  # casefolded name -> the URI that has it

    def name(self, uri: str) -> str:
        parts = _segments(uri)
        inside = parts[: len(self.base)] == self.base and len(parts) > len(self.base)
        rel = parts[len(self.base):] if inside else parts  # outside the base (it never is, as callers make it): whole
        name = "/".join(_safe(p) for p in rel or ["document"]) + ".md"
        owner = self.taken.setdefault(name.casefold(), uri)
        if owner != uri:  # another document has it: this one gets a name of its own
            name = name[: -len(".md")] + "-" + hashlib.sha256(uri.encode()).hexdigest()[:8] + ".md"
            self.taken[name.casefold()] = uri
        return name


class MarkdownWriter:
    """Writes documents' Markdown files under ``dest`` (a folder or URI), each complete or not at all."""

    def __init__(self, dest: str, base: list[str], storage: StorageOptions | None = None):
        try:
            self.out = Output(dest, storage)
            if self.out.rename:  # a local folder; an object store has no folders to make
                self.out.fs.create_dir(self.out.base, recursive=True)
        except Exception as exc:
            raise OutputError(explain(f"cannot write Markdown to {dest}: {describe(exc)}")) from None
        self.names = MarkdownNames(base)
        self.written = 0

    def write(self, doc: dict[str, Any], pages: Iterable[dict[str, Any]]) -> str:
        """Write one document's file; its path relative to ``dest``."""
        name = self.names.name(doc["source_uri"])
        try:
            self.out.write_bytes(name, document_markdown(doc, pages).encode())  # makes a local file's folder
        except Exception as exc:
            raise OutputError(explain(f"cannot write {self.out.path(name)}: {describe(exc)}")) from None
        self.written += 1
        return name


@dataclass
class Exported:
    files: int
    documents: dict[str, int]  # by status


def export_markdown(output: str, dest: str, storage: StorageOptions | None = None) -> Exported:
    """Every document's latest result in OUT (its latest row that is not 'skipped', with that run's pages) as a
    Markdown file under ``dest``, named relative to the folder holding all of OUT's documents."""
    from docpipe.output.tables import files_by_run, read_rows, read_table

    out = Output(output, storage)
    try:
        rows = read_rows(out, "documents", ["source_uri", "doc_id", "run_id", "status", "error_type",
                                            "error_message", "page_count"])
    except Exception as exc:
        raise OutputError(explain(f"cannot read {out.uri}/documents: {describe(exc)}")) from None
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:  # oldest run first: a later result replaces an earlier one; a skipped row stands for its ok row
        if row["status"] != "skipped":
            latest[row["source_uri"]] = row
    if not latest:
        raise OutputError(f"no documents in {out.uri}: is it a docpipe output (docpipe run -o)?")
    writer = MarkdownWriter(dest, common_folder(_segments(u)[:-1] for u in latest), storage)
    by_run: dict[str, dict[str, dict[str, Any]]] = {}
    for uri, row in latest.items():
        by_run.setdefault(row["run_id"], {})[uri] = row
    counts: dict[str, int] = {}
    page_files = files_by_run(out, "pages")
    for run_id, docs in sorted(by_run.items()):  # one run's pages at a time: memory stays one run's
        pages: dict[str, list[dict[str, Any]]] = {uri: [] for uri in docs}
        if page_files.get(run_id):
            table = read_table(out, "pages", ["source_uri", "doc_id", "page_number", "status", "text", "error_type",
                                              "error_message"], files=page_files[run_id], uris=docs)
            for page in table.to_pylist():
                if page["doc_id"] == docs[page["source_uri"]]["doc_id"]:
                    pages[page["source_uri"]].append(page)
        for uri in sorted(docs):
            writer.write(docs[uri], pages[uri])
            counts[docs[uri]["status"]] = counts.get(docs[uri]["status"], 0) + 1
    return Exported(writer.written, counts)
