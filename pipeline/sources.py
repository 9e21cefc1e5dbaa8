"""Where documents come from: expand INPUT arguments into a list of documents, and read their bytes."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from pipeline.errors import InputError


@dataclass(frozen=True)
class DocumentRef:
    """A document to process. Only its location and size travel; the bytes are read inside a task."""

    source_uri: str
    size_bytes: int | None = None


def list_inputs(inputs: list[str]) -> list[DocumentRef]:
    """Expand files, folders (recursively) and glob patterns into documents, sorted and de-duplicated.

    Every regular file found is listed, whatever its extension: a file docpipe can't read
    gets an error row later, rather than being left out here without a trace.
    """
    seen: dict[str, DocumentRef] = {}
    for arg in inputs:
        for path in _expand(arg):
            real = os.path.abspath(path)
            if real not in seen:
                seen[real] = DocumentRef(source_uri=real, size_bytes=os.path.getsize(real))
    return [seen[k] for k in sorted(seen)]


def _expand(arg: str) -> list[str]:
    if os.path.isfile(arg):
        return [arg]
    if os.path.isdir(arg):
        found = []
        for root, dirs, files in os.walk(arg):
            dirs.sort()
            found.extend(os.path.join(root, f) for f in sorted(files) if os.path.isfile(os.path.join(root, f)))
        return found
    if glob.has_magic(arg):
        matches = [p for p in glob.glob(arg, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise InputError(f"input pattern matches no files: {arg}")
        return matches
    raise InputError(f"input not found: {arg}")


def read_bytes(uri: str) -> bytes:
    with open(uri, "rb") as f:
        return f.read()
