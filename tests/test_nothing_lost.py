"""Nothing lost: bad input, crashes and resume. Every run here is checked for full accounting."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow.parquet as pq
import pymupdf
import pytest

from tests.bad_inputs import PAGES, write_corpus
from tests.conftest import run_cli, start_cli


def check_accounting(out, inputs: list[str]):
    """Every input accounted for in each run: one documents row, or counted as skipped unchanged at listing (ok
    before, or failed for good before: no row); the run's counts add up to the number of inputs."""
    docs = pq.read_table(out / "documents").to_pylist()
    for manifest_path in (out / "_runs").glob("*.json"):
        m = json.loads(manifest_path.read_text())
        rows = sorted(d["source_uri"] for d in docs if d["run_id"] == m["run_id"])
        unchanged = m["counters"]["skipped_unchanged_listing"] + m["counters"]["skipped_failed_unchanged"]
        assert len(set(rows)) == len(rows) and set(rows) <= set(inputs) and len(rows) + unchanged == len(inputs)
        assert m["documents"]["total"] == len(rows) == sum(v for k, v in m["documents"].items() if k != "total")
    return docs


@pytest.fixture(scope="module")
def mixed(sample_docs, tmp_path_factory, local_job):
    """The bad-input corpus on the local executor: rendering, error rows and the ledger are the subject, and they
    are the same code under Ray (a model actor dying and a node dying are tests/test_node_loss.py's and the
    actor test's here)."""
    folder = tmp_path_factory.mktemp("mixed")
    expected = write_corpus(folder)
    for name in ("report.pdf", "receipt.png", "scan.jpg"):
        shutil.copy(sample_docs / name, folder / name)
        expected[name] = ("ok", None)
    # a document whose rendering hangs on page 2 (fault injection: no real file reliably hangs MuPDF)
    (folder / "hangs.pdf").write_bytes((sample_docs / "report.pdf").read_bytes() + b"\n% hangs\n")
    expected["hangs.pdf"] = ("partial", "timeout")
    out = tmp_path_factory.mktemp("out")
    proc = run_cli("run", folder, "--output", out, "--model", "tiny-random", "--max-new-tokens", "2", "--no-progress",
                   "--config", local_job,
                   # long enough for a slow page on a loaded 2-core machine (5 s once cut off broken_xref.pdf)
                   "--page-timeout", "15", env={"DOCPIPE_FAULT_RENDER": "hangs.pdf@2=3600"})
    return folder, out, expected, proc


def test_a_folder_of_bad_inputs_is_fully_accounted_for(mixed):
    folder, out, expected, proc = mixed
    assert proc.returncode == 0, proc.stderr[-3000:]
    inputs = [str(folder / name) for name in expected]
    docs = {d["source_uri"].rsplit("/", 1)[-1]: d for d in check_accounting(out, inputs)}
    for name, (status, error_type) in expected.items():
        d = docs[name]
        assert (d["status"], d["error_type"]) == (status, error_type), (name, d["error_message"])
        if status == "error":
            assert d["error_message"]
    # MuPDF rebuilt broken_xref.pdf's cross-reference table and lost no content: ok, and flagged repaired
    assert docs["broken_xref.pdf"]["repaired"] is True and docs["huge_page.pdf"]["repaired"] is False
    assert docs["exif.jpg"]["repaired"] is None  # not a PDF
    pages = pq.read_table(out / "pages").to_pylist()
    per_doc = Counter(p["source_uri"].rsplit("/", 1)[-1] for p in pages)
    for name, count in PAGES.items():
        assert per_doc[name] == docs[name]["page_count"] == count, name
    huge = next(p for p in pages if p["source_uri"].endswith("huge_page.pdf"))
    assert (huge["width"], huge["height"]) == (1960, 1960)  # a 200-inch page, rendered at the target size
    exif = next(p for p in pages if p["source_uri"].endswith("exif.jpg"))
    assert (exif["width"], exif["height"]) == (40, 80)  # rotation applied


def test_a_rerun_skips_what_is_done_and_retries_errors(mixed, local_job):
    folder, out, expected, _ = mixed
    proc = run_cli("run", folder, "--output", out, "--model", "tiny-random", "--max-new-tokens", "2", "--no-progress",
                   "--config", local_job)  # resume is decided before either executor starts
    assert proc.returncode == 0, proc.stderr[-3000:]
    inputs = [str(folder / name) for name in expected]
    docs = check_accounting(out, inputs)
    second = max(json.loads(p.read_text())["finished_at"] + p.stem for p in (out / "_runs").glob("*.json"))
    run2 = {d["source_uri"].rsplit("/", 1)[-1]: d for d in docs if d["run_id"] == second[-len(d["run_id"]):]}
    # ok, and every error here (decided by the bytes: empty, not a document, corrupt, encrypted, a bomb): unchanged,
    # not read, no row; partial (the hang, gone now): retried, and ok
    assert {name: d["status"] for name, d in run2.items()} == {"hangs.pdf": "ok"}
    manifest = json.loads((out / "_runs" / f"{run2['hangs.pdf']['run_id']}.json").read_text())
    counts = Counter(status for status, _ in expected.values())
    assert (manifest["counters"]["skipped_unchanged_listing"], manifest["counters"]["skipped_failed_unchanged"],
            manifest["counters"]["documents_read"]) == (counts["ok"], counts["error"], 1)
    ok_rows = Counter(d["source_uri"] for d in docs if d["status"] == "ok")
    assert set(ok_rows.values()) == {1}  # never a second ok row for a document


def test_fail_fast_stops_at_the_first_error_with_its_traceback(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.pdf").write_bytes(b"%PDF-1.7\n" + b"\x00" * 64)
    proc = run_cli("run", tmp_path / "in", "--output", tmp_path / "out", "--model", "tiny-random", "--fail-fast")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "RowError: cannot open PDF" in proc.stderr
    assert "stopped at the first error (--fail-fast)" in proc.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "out" / "_runs").glob("*.json"))


def test_a_2000_page_pdf_streams_in_constant_memory(tmp_path):
    """Memory held after 2,000 pages is that of 200: Python allocations are traced, and keeping the records
    would cost several times the limit."""
    import tracemalloc

    import psutil

    from docpipe.config import RenderOptions
    from docpipe.render.document import expand_document

    doc = pymupdf.open()
    for i in range(2000):
        doc.new_page(width=300, height=400).insert_text((20, 40), f"page {i + 1} " * 5)
    path = tmp_path / "long.pdf"
    doc.save(path)
    proc, rss, traced = psutil.Process(), {}, {}
    pages = kept_cost = 0
    tracemalloc.start()
    try:
        for rec in expand_document(str(path), RenderOptions(), 400):
            if rec["kind"] != "page":
                continue
            pages += 1
            if pages > 200:
                kept_cost += sys.getsizeof(rec) + sum(sys.getsizeof(v) for v in rec.values())
            if pages in (200, 2000):
                traced[pages], rss[pages] = tracemalloc.get_traced_memory()[0], proc.memory_info().rss
    finally:
        tracemalloc.stop()
    assert pages == 2000
    limit = 2**19  # 512 KiB; measured growth here: under 1 KiB
    assert kept_cost > 4 * limit  # what keeping pages 201-2000 would hold
    assert traced[2000] - traced[200] < limit  # pages are yielded one at a time, never accumulated
    assert rss[2000] - rss[200] < 40 * 2**20  # nor does MuPDF's side grow with the page count


def wait_for(condition, proc, timeout_s: float) -> bool:
    """Poll for a file the run writes, until it is there, the process has ended, or the safety net's deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            return condition()
        time.sleep(0.1)
    return True


def sealed_ok(out) -> set[str]:
    """The documents of sealed (renamed into place, so whole) files with status ok."""
    files = list((out / "documents").rglob("part-*.parquet"))
    return {d["source_uri"] for f in files for d in pq.read_table(f).to_pylist() if d["status"] == "ok"}


@pytest.mark.ray
def test_killed_midway_then_resumed_ends_with_every_document_ok_once(sample_docs, tmp_path, local_job):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        for name in ("report.pdf", "minutes.pdf", "receipt.png"):
            # distinct bytes, so each copy is its own document (readers ignore data after the end marker)
            data = (sample_docs / name).read_bytes() + f"\n% copy {i}\n".encode()
            (folder / f"{i}-{name}").write_bytes(data)
    inputs = sorted(str(p) for p in folder.iterdir())
    out = tmp_path / "out"
    args = ["run", folder, "--output", out, "--model", "tiny-random",
            "--max-new-tokens", "2", "--checkpoint-seconds", "0.001", "--num-actors", "1", "--no-progress",
            # no render time limit cuts the held page off while the test waits
            "--page-timeout", "3600", "--document-timeout", "3600", "--text-layer", "never",
            # the local executor: what a kill leaves (sealed files, open tmp files) and what a rerun makes of it are
            # the sink's and resume's, the same under Ray (a run killed on Ray: test_node_loss)
            "--config", local_job]
    # One page of a document in the middle is held until a file that never comes: the run cannot finish before
    # it is killed, and the documents before it are sealed by then.
    hold = tmp_path / "hold"
    victim = start_cli(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={"DOCPIPE_FAULT_RENDER": f"2-minutes.pdf@1=until:{hold}"}, new_session=True)
    try:
        # events, both files the run writes: the held page is waiting, and a sealed file has a finished document
        # (the deadline is only a safety net against a broken run)
        assert wait_for(lambda: hold.with_name("hold.waiting").exists() and sealed_ok(out), victim, 300), \
            "the held page never started, or no document was sealed"
    finally:
        os.killpg(victim.pid, signal.SIGKILL)  # the driver and the render process it started
        victim.wait()
    assert not list((out / "_runs").glob("*.json")), "the run finished before it could be killed"
    done_before = sealed_ok(out)
    assert 0 < len(done_before) < len(inputs)
    left_behind = list(out.rglob("_tmp-*"))  # files the killed run had open, if any

    # the rerun: what it must find (sealed files, tmp files left behind) is the killed run's, and resuming is
    # decided before either executor starts
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = pq.read_table(out / "documents").to_pylist()
    ok = Counter(d["source_uri"] for d in docs if d["status"] == "ok")
    assert sorted(ok) == inputs and set(ok.values()) == {1}  # every document ok, exactly once
    [manifest] = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    resumed = [d for d in docs if d["run_id"] == manifest["run_id"]]  # what was sealed is not redone: no row
    assert sorted(d["source_uri"] for d in resumed) == sorted(set(inputs) - done_before)
    assert manifest["counters"]["skipped_unchanged_listing"] == len(done_before)
    # whatever the killed run left half-written was never visible to readers, and the rerun removed it
    assert manifest["counters"]["stale_tmp_files_removed"] == len(left_behind)
    assert not list(out.rglob("_tmp-*"))
    pages = pq.read_table(out / "pages").to_pylist()
    ok_runs = {(d["source_uri"], d["run_id"]) for d in docs if d["status"] == "ok"}
    for uri in inputs:
        mine = [p for p in pages if (p["source_uri"], p["run_id"]) in ok_runs and p["source_uri"] == uri]
        count = next(d["page_count"] for d in docs if d["source_uri"] == uri and d["status"] == "ok")
        assert sorted(p["page_number"] for p in mine) == list(range(1, count + 1))


def test_a_flaky_s3_endpoint_loses_nothing(s3, s3_env, sample_docs, tmp_path, local_job):
    """503 SlowDown and connection resets for a while, in front of a real S3 server: the run completes. On the local
    executor: the retries are the storage layer's, the same in a Ray worker (test_s3 runs S3 through Ray)."""
    from tests.faulty_proxy import FaultyProxy

    s3.create_bucket(Bucket="flaky")
    names = sorted(p.name for p in sample_docs.iterdir())
    for name in names:
        s3.put_object(Bucket="flaky", Key=f"in/{name}", Body=(sample_docs / name).read_bytes())
    with FaultyProxy(s3_env["AWS_ENDPOINT_URL"], faulty_requests=80, every=2) as proxy:
        proc = run_cli("run", "s3://flaky/in", "--output", "s3://flaky/out", "--model", "tiny-random",
                       "--max-new-tokens", "2", "--no-progress", "--config", local_job,
                       env={**s3_env, "AWS_ENDPOINT_URL": proxy.url})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proxy.errors_503 >= 10 and proxy.resets >= 10  # the faults really happened
    objects = s3.list_objects_v2(Bucket="flaky", Prefix="out/_runs/")["Contents"]
    [manifest] = [json.loads(s3.get_object(Bucket="flaky", Key=o["Key"])["Body"].read()) for o in objects
                  if o["Key"].endswith(".json")]  # pyarrow also leaves an empty "out/_runs/" folder marker
    assert manifest["documents"] == {"ok": 5, "error": 1, "total": 6} and manifest["pages"]["ok"] == 9
    # every Parquet object came through whole: the datasets read back and add up
    from tests.test_s3 import s3fs

    fs = s3fs(s3_env)
    assert pq.read_table("flaky/out/documents", filesystem=fs).num_rows == 6
    assert pq.read_table("flaky/out/pages", filesystem=fs).num_rows == 9


@pytest.mark.ray
def test_a_model_actor_that_dies_is_restarted_and_its_pages_retried(sample_docs, tmp_path):
    marker = tmp_path / "die-once"
    marker.write_text("x")
    out = tmp_path / "out"
    proc = run_cli("run", sample_docs, "--output", out, "--model", "tiny-random", "--max-new-tokens", "2",
                   "--num-actors", "1", "--no-progress", "--text-layer", "never",  # every page to the actor that dies
                   env={"DOCPIPE_FAULT_DIE_ONCE": str(marker)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()  # the actor really died once
    inputs = sorted(str(p) for p in sample_docs.iterdir())
    docs = check_accounting(out, inputs)
    assert Counter(d["status"] for d in docs) == {"ok": 5, "error": 1}
    pages = pq.read_table(out / "pages").to_pylist()
    assert len(pages) == 9 and all(p["status"] == "ok" for p in pages)


def test_hanging_slow_and_crashing_renders_are_cut_off_and_recorded(sample_docs, tmp_path):
    """Rendering runs in a child process under per-page and per-document limits: a page that hangs, a document
    that is slow overall, and a renderer that crashes each end in error rows, and the run goes on; a page cut off
    or crashed on takes no later page with it."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, source in [("hang.pdf", "report.pdf"), ("slow.pdf", "report.pdf"), ("crash.pdf", "minutes.pdf"),
                         ("fine.pdf", "report.pdf")]:
        shutil.copy(sample_docs / source, folder / name)
    slow = pymupdf.open()
    for i in range(10):
        slow.new_page().insert_text((72, 72), f"page {i + 1}")
    slow.save(folder / "slow.pdf")
    (folder / "hang.pdf").write_bytes((sample_docs / "report.pdf").read_bytes() + b"\n% hang\n")
    config = tmp_path / "job.yaml"
    # the local executor: the limits are the render process's (expand_document_isolated), the same under Ray
    config.write_text(f"inputs: ['{folder}']\noutput: {tmp_path / 'out'}\nprogress: false\nexecutor: local\n"
                      "model: {name: tiny-random, max_new_tokens: 2}\n"
                      "render: {page_timeout_s: 8, document_timeout_s: 14}\n")
    faults = "hang.pdf@2=3600,slow.pdf@*=2,crash.pdf@2=crash"
    proc = run_cli("run", "--config", config, env={"DOCPIPE_FAULT_RENDER": faults}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    docs = {d["source_uri"].rsplit("/", 1)[-1]: d for d in check_accounting(out, sorted(map(str, folder.iterdir())))}
    pages = {}
    for p in pq.read_table(out / "pages").to_pylist():
        pages.setdefault(p["source_uri"].rsplit("/", 1)[-1], {})[p["page_number"]] = p
    assert docs["fine.pdf"]["status"] == "ok"
    # page 2 hangs: cut off at the page limit, it alone is an error row; a fresh render process goes on with page 3
    assert docs["hang.pdf"]["status"] == "partial" and docs["hang.pdf"]["error_type"] == "timeout"
    assert pages["hang.pdf"][1]["status"] == "ok" and pages["hang.pdf"][1]["text"] is not None
    assert [pages["hang.pdf"][n]["error_type"] for n in (2, 3)] == ["timeout", None]
    assert pages["hang.pdf"][3]["status"] == "ok" and pages["hang.pdf"][3]["text"] is not None
    assert "page time limit (8 s)" in pages["hang.pdf"][2]["error_message"]
    # 2 s a page is within the page limit, but 10 pages take longer than the 14 s document limit
    statuses = [pages["slow.pdf"][n]["status"] for n in range(1, 11)]
    assert statuses[0] == "ok" and statuses[-1] == "error" and statuses == sorted(statuses, reverse=True)
    assert all("document time limit (14 s)" in p["error_message"] for p in pages["slow.pdf"].values()
               if p["status"] == "error")
    assert docs["slow.pdf"]["status"] == "partial"
    # the renderer dies on page 2: page 1 survives, page 2 is recorded as a crash, the pages after it are rendered
    assert "crash.pdf" in pages, docs["crash.pdf"]
    assert pages["crash.pdf"][1]["status"] == "ok"
    assert pages["crash.pdf"][2]["error_type"] == "renderer_crashed"
    assert all(p["status"] == "ok" for n, p in pages["crash.pdf"].items() if n > 2)
    assert docs["crash.pdf"]["status"] == "partial"
