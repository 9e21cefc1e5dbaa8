"""OUT as a store: a filesystem and a base path (local or object storage), its tables' sealed files, and the removal
of stale temporary files.
"""

from __future__ import annotations

import os


from docpipe.config import StorageOptions
from docpipe.errors import OutputError, describe
from docpipe.storage import explain, is_remote, join, resolve


class Output:
    """OUT as a filesystem and a base path, local or in object storage."""

    def __init__(self, uri: str, storage: StorageOptions | None = None):
        from pyarrow.fs import LocalFileSystem

        self.uri = uri.rstrip("/") if is_remote(uri) else os.path.abspath(uri)
        self.fs, self.base = resolve(uri, storage)
        # Local files are written under a name readers skip, then renamed. An object store shows an object
        # only once its upload completes, so there the final name is written directly (no copy).
        self.rename = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return join(self.base, *parts)

    def write_bytes(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        target = self.path(os.path.dirname(rel), "_tmp-" + os.path.basename(rel)) if self.rename else final
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        if self.rename:
            self.fs.move(target, final)


def prepare_output(output: str, storage: StorageOptions | None = None) -> Output:
    """Check OUT can be written (a fatal error otherwise), before any document is read."""
    from pyarrow.fs import FileType

    try:
        out = Output(output, storage)
        if out.fs.get_file_info(out.base).type == FileType.File:
            raise OutputError(f"output is a file, not a folder: {output}")
        for sub in ("pages", "documents", "_runs"):
            out.fs.create_dir(out.path(sub), recursive=True)
        probe = out.path("_runs", f".probe-{os.getpid()}")
        with out.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        out.fs.delete_file(probe)
    except OutputError:
        raise
    except Exception as exc:  # OSError, or the SDK's errors for a missing bucket or bad credentials
        raise OutputError(explain(f"cannot write to output {output}: {describe(exc)}")) from None
    return out


def remove_stale_tmp(out: Output, keep_run: str) -> int:
    """Delete the ``_tmp-`` files that killed runs left (readers skip them, but they take space and confuse
    globbing engines). Called only by the holder of the output's lease (pipeline/output/lease.py), so no other run is
    writing: every file not named after ``keep_run`` (this run) is a dead run's."""
    if not out.rename:  # object stores: the final name is written directly, and an unfinished upload is invisible
        return 0
    mine = f"_tmp-part-{keep_run}-"
    try:
        stale = [path for table in ("pages", "documents") for path in table_files(out, table, "_tmp-")
                 if not os.path.basename(path).startswith(mine)]
        for path in stale:
            out.fs.delete_file(path)
    except OSError as exc:
        raise OutputError(f"cannot remove a killed run's unfinished files in {out.uri}: {describe(exc)}") from None
    return len(stale)


def sealed_files(out: Output, table: str) -> list[str]:
    """A table's finished Parquet files, in every partition folder (never the _tmp- ones being written)."""
    return [path for path in table_files(out, table, "part-") if path.endswith(".parquet")]


def table_files(out: Output, table: str, prefix: str) -> list[str]:
    """Files under a table's folder, in every partition folder, whose names start with ``prefix``; sorted."""
    from pyarrow.fs import FileSelector, FileType

    infos = out.fs.get_file_info(FileSelector(out.path(table), recursive=True, allow_not_found=True))
    return sorted(f.path for f in infos if f.type == FileType.File and f.base_name.startswith(prefix))
