"""Error rows have one maker (docpipe.errors.error_fields, RowError) typed by docpipe.schemas.ErrorType."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from docpipe.errors import ERROR_KEYS, RowError, error_fields
from docpipe.schemas import ErrorType

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
MAKERS = {"RowError", "error_fields"}


def test_error_fields_store_the_enum_string():
    fields = error_fields(ErrorType.model_error, "RuntimeError: boom")
    assert fields == {"status": "error", "error_type": "model_error", "error_message": "RuntimeError: boom"}
    assert type(fields["error_type"]) is str  # the plain string: f-strings and Arrow see "model_error"
    assert f"{fields['error_type']}" == "model_error"
    partial = error_fields(ErrorType.extraction_failed, "1 of 2 chunks", status="partial")
    assert partial["status"] == "partial" and partial["error_type"] == "extraction_failed"
    assert set(fields) - {"status"} == set(ERROR_KEYS)


def test_row_error_carries_its_type_and_fields():
    exc = RowError(ErrorType.empty_file, "file is empty (0 bytes)")
    assert str(exc) == "file is empty (0 bytes)"  # what a --fail-fast traceback shows
    assert exc.error_type is ErrorType.empty_file
    assert exc.fields() == {"status": "error", "error_type": "empty_file", "error_message": "file is empty (0 bytes)"}


@pytest.mark.parametrize("make", [lambda t: error_fields(t, "m"), lambda t: RowError(t, "m")])
@pytest.mark.parametrize("bad", ["model_error", "not-a-type", None])
def test_a_string_is_not_an_error_type(make, bad):
    with pytest.raises(TypeError, match="docpipe.schemas.ErrorType"):
        make(bad)


def _hand_made_error_rows(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each place that writes an error type other than through the makers."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key in node.keys:
                if isinstance(key, ast.Constant) and key.value == "error_type":
                    found.append((node.lineno, 'a dict literal with an "error_type" key'))
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "error_type":
                    found.append((node.lineno, "error_type= passed by keyword (dict(), .update())"))
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in MAKERS and node.args and isinstance(node.args[0], ast.Constant):
                found.append((node.lineno, f"a literal error type passed to {name}"))
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant)
                        and target.slice.value == "error_type"):
                    found.append((node.lineno, 'rec["error_type"] assigned'))
        elif isinstance(node, ast.Tuple) and node.elts:  # a (type, message) failure, as the render process sends
            first = node.elts[0]
            if isinstance(first, ast.Constant) and first.value in {t.value for t in ErrorType} and len(node.elts) == 2:
                found.append((node.lineno, f"a ({first.value!r}, message) tuple"))
    return found


def test_no_error_row_is_made_by_hand():
    offenders = []
    for path in sorted(PIPELINE.rglob("*.py")):
        if path == PIPELINE / "errors.py":
            continue
        offenders += [f"{path.relative_to(PIPELINE.parent)}:{line}: {what}"
                      for line, what in _hand_made_error_rows(ast.parse(path.read_text(), str(path)))]
    assert offenders == [], "make error rows with docpipe.errors.error_fields / RowError and a docpipe.schemas.ErrorType"


@pytest.mark.parametrize("code", [
    'rec.update(status="error", error_type="model_error", error_message="x")',
    'row = {"status": "error", "error_type": "read_error", "error_message": "x"}',
    'raise RowError("image_too_large", "x")',
    'rec.update(error_fields("model_error", "x"))',
    'rec["error_type"] = "lost"',
    'failure = ("timeout", "rendering exceeded the page time limit")',
])
def test_the_guard_sees_each_way_of_writing_one_by_hand(code):
    assert _hand_made_error_rows(ast.parse(code))


def test_the_guard_passes_the_makers():
    code = ("rec.update(error_fields(ErrorType.model_error, describe(exc)))\n"
            "raise RowError(ErrorType.empty_file, 'file is empty')\n"
            "yield {**doc, **exc.fields()}\n")
    assert _hand_made_error_rows(ast.parse(code)) == []
