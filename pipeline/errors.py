"""Errors that end a run, and the shape of errors that become rows.

Per-document and per-page failures never raise across a batch boundary: they become
rows with an error_type and error_message. Only the problems below stop a run.
"""

from __future__ import annotations


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


# Set by the local executor for --fail-fast: stages re-raise instead of recording an error row.
FAIL_FAST = False


def reraise_if_fail_fast() -> None:
    """Call inside an except block that turns an exception into an error row."""
    if FAIL_FAST:
        raise


class RowError(Exception):
    """A failure that belongs to one document or page; turned into a row by the stage that catches it."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def describe(exc: BaseException, limit: int = 500) -> str:
    """One line naming the exception, short enough for a Parquet cell, with any known secret blanked out."""
    from pipeline.storage import redact

    text = redact(f"{type(exc).__name__}: {exc}".replace("\n", " ").strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"
