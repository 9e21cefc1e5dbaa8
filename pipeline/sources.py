"""Where documents come from: expand INPUT arguments and manifests into a list of documents.

Listing touches metadata only (names and sizes, page by page from object stores); the
bytes are read later, one document at a time, inside the read-and-render tasks.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from docpipe.config import StorageOptions
from docpipe.errors import InputError, describe
from docpipe.storage import explain, glob_to_regex, has_magic, is_remote, resolve, scheme_of, strip_scheme


@dataclass(frozen=True)
class DocumentRef:
    """A document to process. Only its location and size travel; the bytes are read inside a task."""

    source_uri: str
    size_bytes: int | None = None
    mtime: datetime | None = None  # UTC; with the size, what incremental runs compare


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _utc(ts: datetime | None) -> datetime | None:
    """A listing's modification time as an aware UTC datetime (pyarrow may give a naive one)."""
    if ts is None:
        return None
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


FILTERED_NAMED = 100  # filtered files named in the run's manifest; all are counted


@dataclass
class Listing:
    refs: list[DocumentRef]
    filtered_out: int = 0
    filtered: list[tuple[str, str]] = field(default_factory=list)  # (URI, why): the files include/exclude dropped


def list_inputs(
    inputs: list[str],
    manifests: list[str] = (),
    include: list[str] = (),
    exclude: list[str] = (),
    storage: StorageOptions | None = None,
    case_sensitive: bool = False,
) -> Listing:
    """Expand inputs and manifests into documents, sorted and de-duplicated, then apply include/exclude (ignoring
    case unless ``case_sensitive``: scanners and phones write SCAN0001.PDF and IMG_0001.JPG).

    Every file found is listed, whatever its extension, unless a filter says otherwise: a
    file docpipe can't read gets an error row later rather than vanishing here; one a filter drops is named.
    """
    storage = storage or StorageOptions()
    seen: dict[str, DocumentRef] = {}
    for arg in inputs:
        for ref in (_expand_remote(arg, storage) if is_remote(arg) else _expand_local(arg)):
            seen.setdefault(ref.source_uri, ref)
    for manifest in manifests:
        for uri in read_manifest(manifest, storage):
            seen.setdefault(uri, DocumentRef(uri))
    refs = [seen[k] for k in sorted(seen)]
    flags = 0 if case_sensitive else re.IGNORECASE
    include = [(p, re.compile(glob_to_regex(p).pattern, flags)) for p in include]
    exclude = [(p, re.compile(glob_to_regex(p).pattern, flags)) for p in exclude]
    why = {r.source_uri: _dropped(r.source_uri, include, exclude) for r in refs}
    kept = [r for r in refs if why[r.source_uri] is None]
    return Listing(kept, filtered_out=len(refs) - len(kept),
                   filtered=[(uri, reason) for uri, reason in why.items() if reason is not None])


def _dropped(uri: str, include, exclude) -> str | None:
    """Why include/exclude drop a listed file, or None when it is kept."""
    def hit(patterns) -> str | None:
        name = uri.rsplit("/", 1)[-1]
        return next((p for p, regex in patterns if (regex.search(uri) if "/" in p else regex.match(name))), None)

    if include and hit(include) is None:
        return "matches no --include (" + ", ".join(repr(p) for p, _ in include) + ")"
    excluded = hit(exclude)
    return None if excluded is None else f"matches --exclude {excluded!r}"


def _expand_local(arg: str) -> list[DocumentRef]:
    path = arg[len("file://") :] if arg.startswith("file://") else arg
    if os.path.isfile(path):
        paths = [path]
    elif os.path.isdir(path):
        paths = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            paths.extend(os.path.join(root, f) for f in sorted(files) if os.path.isfile(os.path.join(root, f)))
    elif glob.has_magic(path):
        paths = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        if not paths:
            raise InputError(f"input pattern matches no files: {arg}")
    else:
        raise InputError(f"input not found: {arg}")
    refs = []
    for p in paths:
        st = os.stat(p)
        mtime = _EPOCH + timedelta(microseconds=st.st_mtime_ns // 1000)  # exact, unlike a float timestamp
        refs.append(DocumentRef(os.path.abspath(p), st.st_size, mtime))
    return refs


def _expand_remote(arg: str, storage: StorageOptions) -> list[DocumentRef]:
    from pyarrow.fs import FileSelector, FileType

    scheme = scheme_of(arg)
    fs, path = resolve(arg, storage)
    pattern = None
    if has_magic(path):
        parts = path.split("/")
        first = next(i for i, part in enumerate(parts) if has_magic(part))
        pattern, path = glob_to_regex(path), "/".join(parts[:first])
    try:
        info = fs.get_file_info(path)
        if pattern is None and info.type == FileType.File:
            return [DocumentRef(f"{scheme}://{path}", info.size, _utc(info.mtime))]
        # The SDK pages through ListObjectsV2 (1,000 keys a request); only names, sizes and times come back.
        entries = fs.get_file_info(FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise InputError(explain(f"cannot list {arg}: {describe(exc)}")) from None
    refs = [
        DocumentRef(f"{scheme}://{e.path}", e.size, _utc(e.mtime))
        for e in entries
        if e.type == FileType.File and (pattern is None or pattern.match(e.path))
    ]
    if not refs:
        bucket = strip_scheme(arg).split("/", 1)[0]
        try:
            missing = fs.get_file_info(bucket).type == FileType.NotFound
        except OSError as exc:
            raise InputError(f"cannot list {arg}: {describe(exc)}") from None
        if missing:
            raise InputError(f"cannot list {arg}: bucket {bucket!r} does not exist")
        raise InputError(f"no objects found under {arg}")
    return refs


def read_manifest(manifest: str, storage: StorageOptions) -> list[str]:
    """URIs listed in a .txt, .csv or .parquet file (local or remote). Relative local paths are taken
    relative to a local manifest's folder."""
    fs, path = resolve(manifest, storage)
    try:
        with fs.open_input_file(path) as f:
            data = f.read()
    except (OSError, FileNotFoundError) as exc:
        raise InputError(f"cannot read manifest {manifest}: {describe(exc)}") from None
    lower = path.lower()
    try:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(data))
            column = next((c for c in ("uri", "source_uri") if c in table.column_names), None)
            if column is None:
                raise InputError(f"manifest {manifest} has no 'uri' or 'source_uri' column")
            uris = [u for u in table.column(column).to_pylist() if u]
        elif lower.endswith(".csv"):
            rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
            header = [h.strip().lower() for h in rows[0]] if rows else []
            col = next((header.index(c) for c in ("uri", "source_uri") if c in header), None)
            body = rows[1:] if col is not None else rows
            uris = [row[col or 0].strip() for row in body if row and row[col or 0].strip()]
        else:
            lines = data.decode("utf-8-sig").splitlines()
            uris = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot parse manifest {manifest}: {describe(exc)}") from None
    if not is_remote(manifest):
        base = os.path.dirname(path)
        uris = [u if is_remote(u) or os.path.isabs(u) else os.path.join(base, u) for u in uris]
        uris = [u if is_remote(u) else os.path.abspath(u) for u in uris]
    return uris
