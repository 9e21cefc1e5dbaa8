"""OUT as a store: a filesystem and a base path (local or object storage), its tables' sealed files, and the removal
of stale temporary files.
"""

from __future__ import annotations

import contextlib
import os


from docpipe.config import StorageOptions
from docpipe.errors import OutputError, describe
from docpipe.storage import explain, is_remote, join, resolve, scheme_of


class Output:
    """OUT as a filesystem and a base path, local or in object storage."""

    def __init__(self, uri: str, storage: StorageOptions | None = None):
        from pyarrow.fs import LocalFileSystem

        self.uri = uri.rstrip("/") if is_remote(uri) else os.path.abspath(uri)
        self.fs, self.base = resolve(uri, storage)
        # Local files are written under a name readers skip, then renamed. An object store shows an object
        # only once its upload completes, so there the final name is written directly (no copy).
        self.rename = isinstance(self.fs, LocalFileSystem)
        self.created = False  # prepare_output made the local folder (remove_skeleton may take it away again)

    def path(self, *parts: str) -> str:
        return join(self.base, *parts)

    def write_bytes(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        target = self.path(os.path.dirname(rel), "_tmp-" + os.path.basename(rel)) if self.rename else final
        if self.rename:  # a local folder must exist; an object store has none to make (and no marker is written)
            self.fs.create_dir(self.path(os.path.dirname(rel)), recursive=True)
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        if self.rename:
            self.fs.move(target, final)


def prepare_output(output: str, storage: StorageOptions | None = None) -> Output:
    """Check OUT can be written (a fatal error otherwise), before any document is read. Its folders are made as
    files are written into them; in an object store there are none (no empty "folder" objects)."""
    from pyarrow.fs import FileType

    try:
        out = Output(output, storage)
        if out.fs.get_file_info(out.base).type == FileType.File:
            raise OutputError(f"output is a file, not a folder: {output}")
        if out.rename:
            out.created = not os.path.isdir(out.base)
            out.fs.create_dir(out.base, recursive=True)
        else:
            bucket = out.base.split("/", 1)[0]  # said in our words: pyarrow's advice names options docpipe lacks
            if out.fs.get_file_info(bucket).type == FileType.NotFound:
                raise OutputError(f"cannot write to output {output}: bucket {bucket!r} does not exist")
        # On S3 the lease, written next, is the write check: pyarrow's delete of a probe would leave an empty
        # "folder/" object behind in its place.
        if scheme_of(output) not in ("s3", "s3a"):
            probe = out.path(f"_probe-{os.getpid()}")
            with out.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            out.fs.delete_file(probe)
    except OutputError:
        raise
    except Exception as exc:  # OSError, or the SDK's errors for a missing bucket or bad credentials
        raise OutputError(explain(f"cannot write to output {output}: {describe(exc)}")) from None
    return out


def remove_skeleton(out: Output) -> None:
    """After a run that failed before writing anything, and gave its lease back: remove the empty folders it made
    in a local OUT, the lease's lock file (pipeline/output/lease.py) while no run holds the lease, and OUT itself
    if this run created it and it is empty now. Best effort: leftovers are harmless."""
    if not out.rename or not os.path.isdir(out.base):
        return
    for root, dirs, files in os.walk(out.base, topdown=False):
        if root != out.base and not os.listdir(root):  # children first: a folder emptied by this walk goes too
            with contextlib.suppress(OSError):
                os.rmdir(root)
    if not os.path.exists(os.path.join(out.base, "_lease.json")):  # no run holds the lease now
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(out.base, "_lease.json.lock"))
        if out.created:
            with contextlib.suppress(OSError):
                os.rmdir(out.base)  # only if empty: whatever else is there stays


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
