"""Merging the extractions of a long document's chunks into one object: later chunks fill what earlier ones left
empty."""

from __future__ import annotations

from typing import Any



def merge_chunks(parts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Merge per-chunk extractions of one document, in page order.

    The rule: for each field the first chunk with a non-null value wins; lists are
    concatenated across chunks; objects are merged field by field with the same rule.
    """
    merged: dict[str, Any] = {}
    for part in parts:
        if isinstance(part, dict):
            merged = _merge(merged, part)
    return merged


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merge(a.get(k), b.get(k)) if k in a else b[k] for k in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    return b if a is None or a == [] or a == {} else a
