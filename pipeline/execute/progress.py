"""Progress lines on stderr while a run's results come in, for runs without progress bars."""

from __future__ import annotations

import sys
import threading
import time

from docpipe.output.sink import RunSink


class Progress:
    """Periodic progress lines on stderr, for runs without progress bars: batch jobs, Ray Jobs (whose logs
    are not a terminal, so Ray Data's bars are off), --no-progress. From a thread of their own, so a run stuck
    on a slow page still says so on time. ``total``: the documents this run reads (not those skipped unchanged)."""

    def __init__(self, sink: RunSink, total: int, interval_s: float, enabled: bool):
        self.sink, self.total, self.interval_s, self.enabled = sink, total, interval_s, enabled
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="docpipe-progress", daemon=True)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.enabled and exc_type is None:
            self.report()  # the final count, so a log ends with where the run got to

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.report()

    def report(self) -> None:
        now = time.monotonic()
        # Copies (single C-level dict copies under the GIL): the driver updates the counts meanwhile. Pages count
        # as they come back, before their document is whole and written.
        docs, pages = dict(self.sink.doc_counts), dict(self.sink.page_counts)
        done, page_total = sum(docs.values()), self.sink.pages_seen
        errors = docs.get("error", 0) + docs.get("partial", 0)
        print(f"docpipe: progress: documents {done}/{self.total}, pages {page_total} "
              f"({page_total / (now - self.t0):.2f} pages/s), documents with errors {errors}, "
              f"pages with errors {pages.get('error', 0)}", file=sys.stderr, flush=True)
