"""A Parquet table written in parts: rows are buffered, written under a hidden name and renamed when complete."""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from docpipe.output.store import Output


class TableWriter:
    """Rows of one table, rolled into Parquet files of at most ``rows_per_file`` rows."""

    def __init__(self, out: Output, table: str, schema: pa.Schema, run_id: str, rows_per_file: int,
                 partition: str = ""):
        self.out, self.table, self.schema, self.run_id = out, table, schema, run_id
        self.folder = f"{table}/{partition}" if partition else table  # e.g. pages/ingest_date=2026-11-25
        self.rows_per_file = rows_per_file
        self.files: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self.rows = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        while rows:
            if self._writer is None:
                self._open()
            take = rows[: self.rows_per_file - self._rows_in_file]
            rows = rows[len(take) :]
            self._writer.write_table(pa.Table.from_pylist(take, schema=self.schema))
            self._rows_in_file += len(take)
            self.rows += len(take)
            if self._rows_in_file >= self.rows_per_file:
                self._seal()

    def seal(self) -> None:
        """Finish the open file now (if it has rows); the next rows start a new one."""
        if self._writer is not None and self._rows_in_file:
            self._seal()

    def close(self) -> list[str]:
        if self._writer is None and not self.files:
            self._open()  # an empty file still carries the schema, so readers of the folder always work
        if self._writer is not None:
            self._seal()
        return self.files

    def _name(self) -> str:
        return f"{self.folder}/part-{self.run_id}-{len(self.files):05d}.parquet"

    def _open(self) -> None:
        final = self._name()
        out = self.out
        if out.rename:  # a local folder must exist; object stores have none to make
            out.fs.create_dir(out.path(self.folder), recursive=True)
        self._target = out.path(self.folder, "_tmp-" + os.path.basename(final)) if out.rename else out.path(final)
        self._stream = out.fs.open_output_stream(self._target)  # a multipart upload on S3
        self._writer = pq.ParquetWriter(self._stream, self.schema, compression="zstd")
        self._rows_in_file = 0

    def _seal(self) -> None:
        final = self._name()
        self._writer.close()
        self._stream.close()
        if self.out.rename:
            self.out.fs.move(self._target, self.out.path(final))
        self.files.append(final)
        self._writer = None
