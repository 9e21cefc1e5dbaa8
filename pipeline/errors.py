"""Errors that end a run, and the shape of errors that become rows.

Per-document and per-page failures never raise across a batch boundary: they become
rows with an error_type and error_message. Only the problems below stop a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from docpipe.schemas import ErrorType


class FatalError(Exception):
    """A problem with the run as a whole: reported in one line, exit code 2."""


class InputError(FatalError):
    """An INPUT argument names nothing that exists."""


class OutputError(FatalError):
    """The output location can't be created or written."""


class ConfigError(FatalError):
    """A setting that can't work (an unknown schema, say), found before any document is read."""


class ClusterError(FatalError):
    """The Ray cluster named by the user can't be joined: nothing answers, a refused token, other versions."""


class ModelLoadError(FatalError):
    """The model or its processor could not be loaded."""


class ExamplesError(FatalError):
    """Fine-tuning examples that can't be used, found before training starts."""


ERROR_KEYS = ("error_type", "error_message")  # a row's error columns, beside its status


class RowError(Exception):
    """A failure that belongs to one document or page; turned into a row by the stage that catches it."""

    def __init__(self, error_type: ErrorType, message: str):
        super().__init__(message)
        self.error_type = _checked(error_type)
        self.message = message

    def fields(self) -> dict[str, Any]:
        """The error row's fields for this failure (see ``error_fields``)."""
        return error_fields(self.error_type, self.message)


def error_fields(error_type: ErrorType, message: str | None, status: str = "error") -> dict[str, Any]:
    """The one way to mark a record or row as failed: its status, error_type and error_message, to merge into
    it (``rec.update(error_fields(...))``). ``status`` is "partial" for a document only some of whose pages
    failed. The stored type is the enum's string, as the contract's Arrow schema has it."""
    return {"status": status, "error_type": _checked(error_type).value, "error_message": message}


def _checked(error_type: ErrorType) -> ErrorType:
    from docpipe.schemas import ErrorType  # lazily: the contract pulls in pyarrow, which `docpipe --help` does without

    if not isinstance(error_type, ErrorType):  # a bare string would slip a typo past the contract until write time
        raise TypeError(f"error_type must be a docpipe.schemas.ErrorType, not {error_type!r}")
    return error_type


def describe(exc: BaseException, limit: int = 500) -> str:
    """One line naming the exception, short enough for a Parquet cell, with any known secret blanked out."""
    from docpipe.storage import redact

    text = redact(f"{type(exc).__name__}: {exc}".replace("\n", " ").strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"
