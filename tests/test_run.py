"""End to end through the real CLI: local Ray, real PyMuPDF rendering, the tiny Idefics2."""

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pymupdf
import pytest
from PIL import Image

from docpipe.schemas import CONTRACT_VERSION, DOCUMENTS_SCHEMA, PAGES_SCHEMA, DocumentRow, PageRow, RunManifest
from tests.conftest import run_cli


def expected_pages(path: Path) -> int | None:
    if path.suffix == ".pdf":
        try:
            return pymupdf.open(path).page_count
        except Exception:
            return None
    return getattr(Image.open(path), "n_frames", 1)


@pytest.fixture(scope="module", params=["auto", "continuous"])
def cli_run(request, sample_docs, tmp_path_factory, local_job):
    """The mixed sample folder (a corrupt PDF among them) with the default engine (generate, on a CPU) and
    with the continuous engine: both must keep the same contract. On the local executor: rows, files and the
    manifest are the stages' and the sink's; the same contract through Ray Data, with two actors and calls in
    flight, is tests/test_fidelity.py's Ray run."""
    out = tmp_path_factory.mktemp("out")
    proc = run_cli("run", sample_docs, "--output", out, "--model", "tiny-random", "--max-new-tokens", "4",
                   "--batch-size", "3", "--engine", request.param, "--no-progress", "--text-layer", "never",
                   "--config", local_job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def test_run_writes_the_contract(cli_run, sample_docs):
    proc, out = cli_run
    pages_t = pq.read_table(out / "pages")
    docs_t = pq.read_table(out / "documents")
    [day] = {m["started_at"][:10] for m in map(json.loads, map(Path.read_text, (out / "_runs").glob("*.json")))}
    for table in (pages_t, docs_t):  # Hive partitions: the run's UTC start date, kept in the folder name
        assert set(table.column("ingest_date").to_pylist()) == {day}
    pages_t, docs_t = pages_t.drop_columns(["ingest_date"]), docs_t.drop_columns(["ingest_date"])
    assert pages_t.schema.remove_metadata() == PAGES_SCHEMA.remove_metadata()
    assert docs_t.schema.remove_metadata() == DOCUMENTS_SCHEMA.remove_metadata()
    files = [f for f in out.rglob("*.parquet")]
    assert files and all(f.parent.name == f"ingest_date={day}" for f in files)
    assert all(pq.read_schema(f).metadata[b"docpipe.contract_version"] == str(CONTRACT_VERSION).encode() for f in files)
    pages = [PageRow(**r) for r in pages_t.to_pylist()]
    docs = [DocumentRow(**r) for r in docs_t.to_pylist()]

    files = sorted(p for p in sample_docs.iterdir())
    assert sorted(d.source_uri for d in docs) == [str(f) for f in files]  # exactly one row per document
    by_uri = {d.source_uri: d for d in docs}

    corrupt = by_uri[str(sample_docs / "corrupt.pdf")]
    assert corrupt.status == "error" and corrupt.error_type == "unsupported_media_type" and corrupt.error_message

    per_doc = Counter(p.source_uri for p in pages)
    for f in files:
        if f.name == "corrupt.pdf":
            assert per_doc[str(f)] == 0
            continue
        d = by_uri[str(f)]
        assert d.status == "ok", d
        assert d.page_count == expected_pages(f) == per_doc[str(f)]
        numbers = sorted(p.page_number for p in pages if p.source_uri == str(f))
        assert numbers == list(range(1, d.page_count + 1))
    for p in pages:
        assert p.status == "ok" and p.text is not None and p.model == "tiny-random"
        assert 1 <= p.output_tokens <= 4 and p.finish_reason in ("stop", "length")
        assert p.doc_id == by_uri[p.source_uri].doc_id and p.page_count == by_uri[p.source_uri].page_count
        if p.source_uri.endswith(".pdf"):
            assert max(p.width, p.height) == 1960  # rendered at twice the processor's longest edge
    assert len({p.run_id for p in pages} | {d.run_id for d in docs}) == 1


def test_run_manifest_is_written_and_adds_up(cli_run, sample_docs):
    proc, out = cli_run
    [manifest_path] = list((out / "_runs").glob("*.json"))
    m = RunManifest(**json.loads(manifest_path.read_text()))
    assert m.documents == {"ok": 5, "error": 1, "total": 6}
    assert m.pages["total"] == m.pages["ok"] == 9  # 3 + 2 + 1 + 1 + 2 pages
    assert m.config["model"]["name"] == "tiny-random" and m.timings["wall_s"] > 0
    for table, names in m.files.items():
        assert all((out / n).exists() for n in names)
    assert not [p for p in out.rglob("_tmp-*")]  # no half-written files left behind
    assert "documents  6 (error 1, ok 5)" in proc.stdout and m.run_id in proc.stdout
    # which engine each model actor ran, and why: auto means generate on a CPU, the continuous engine on a GPU
    import torch

    cuda = torch.cuda.is_available()
    requested = m.config["model"]["engine"]
    generate = requested == "auto" and not cuda
    assert m.engines and {e["requested"] for e in m.engines} == {requested}
    assert {e["engine"] for e in m.engines} == {"generate" if generate else "continuous"}
    if cuda:  # on a GPU the engine is sized from the memory left, and the reason says how (sizing.py's describe)
        for e in m.engines:
            assert re.fullmatch(rf"{'auto on cuda' if requested == 'auto' else 'requested'}; (\d+) pages in "
                                r"flight, encoding \d+ at a time \(sized from .*", e["reason"]), e["reason"]
    else:
        # the continuous engine says which attention its loop runs: on a CPU, transformers' sdpa
        assert {e["reason"] for e in m.engines} == {
            "auto on cpu" if requested == "auto" else "requested; attention sdpa (auto on cpu)"}
    name = "generate" if generate else "continuous"
    assert f"engine     {name} x{len(m.engines)} ({m.engines[0]['reason']})" in proc.stdout
    rows_per_call = m.config["model"]["batch_size"] * m.config["model"]["sort_window"]
    calls = {e["peak_calls_in_flight"] for e in m.engines}  # one call at a time with generate, up to 2 else
    assert calls == {1} if generate else calls <= {1, 2}
    for e in m.engines:  # pages an actor held at once: the continuous engine's bound (generate doesn't count)
        # the bank's size: calls_in_flight x rows_per_call on a CPU, the planned pages in flight on a GPU
        bound = int(re.search(r"; (\d+) pages in flight", e["reason"]).group(1)) if cuda else 2 * rows_per_call
        assert e["peak_pages_in_flight"] is None if generate else 1 <= e["peak_pages_in_flight"] <= bound


def test_missing_input_is_fatal_with_one_line(tmp_path):
    proc = run_cli("run", tmp_path / "missing", "--output", tmp_path / "out", "--model", "tiny-random")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"docpipe: error: input not found: {tmp_path / 'missing'}"]


def test_unwritable_output_is_fatal(tmp_path, sample_docs):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("run", sample_docs / "receipt.png", "--output", blocker, "--model", "tiny-random")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"docpipe: error: output is a file, not a folder: {blocker}"]


def test_bad_option_value_is_fatal(tmp_path, sample_docs):
    proc = run_cli("run", sample_docs, "--output", tmp_path, "--batch-size", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "batch_size" in proc.stderr


@pytest.mark.ray
def test_a_model_that_cannot_be_loaded_is_fatal_with_exit_2(tmp_path, sample_docs, tiny_checkpoint):
    import shutil

    # nothing there: found on the driver before anything else
    proc = run_cli("run", sample_docs / "receipt.png", "--output", tmp_path / "a", "--model", tmp_path / "nothing")
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    assert line == f"docpipe: error: no such model folder: {tmp_path / 'nothing'}"
    # a checkpoint without weights: it fails inside the Ray model actor, and still ends as one fatal line
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    # no progress line either, however long Ray takes to start and fail on a loaded machine (one comes every 30 s)
    proc = run_cli("run", sample_docs / "receipt.png", "--output", tmp_path / "b", "--model", broken, "--no-progress",
                   "--progress-interval", "3600")
    assert proc.returncode == 2, proc.stderr[-3000:]
    # the model loads on the first page that needs it: the actor's call fails, and Ray's log (a file) has its traceback
    ray_log, error = proc.stderr.strip().splitlines()
    assert ray_log.startswith("docpipe: Ray's own log lines go to "), proc.stderr[-3000:]
    assert error.startswith(f"docpipe: error: cannot load model '{broken}': OSError: "), proc.stderr[-3000:]
    assert not list((tmp_path / "b").rglob("_runs/*.json"))


def test_internal_errors_exit_1_and_docpipe_debug_shows_the_traceback(monkeypatch, capsys, tmp_path):
    import docpipe.execute.run
    from docpipe.cli import main

    def broken(config):
        raise RuntimeError("boom")

    monkeypatch.setattr(docpipe.execute.run, "run", broken)
    monkeypatch.delenv("DOCPIPE_DEBUG", raising=False)
    argv = ["run", str(tmp_path), "--output", str(tmp_path / "out")]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "docpipe: internal error: RuntimeError: boom (set DOCPIPE_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("DOCPIPE_DEBUG", "1")
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and 'raise RuntimeError("boom")' in lines[-3]
    assert lines[-1] == "docpipe: internal error: RuntimeError: boom"  # not the --fail-fast message


def test_local_executor_flat_output_and_no_resume(sample_docs, tmp_path):
    """executor: local (in this process, no Ray), --partition-by none (flat folders), --no-resume (everything
    processed again), each through the command line's parsing."""
    from docpipe.cli import build_parser, config_from_args
    from docpipe.execute.run import run

    job = tmp_path / "job.yaml"
    job.write_text("executor: local\nprogress: false\n")
    out = tmp_path / "out"

    def config(*extra):
        args = build_parser().parse_args(["run", str(sample_docs / "receipt.png"), str(sample_docs / "fax.tiff"),
                                          "--output", str(out), "--config", str(job), "--model", "tiny-random",
                                          "--max-new-tokens", "2", "--partition-by", "none", *extra])
        return config_from_args(args, args.inputs, args.output)

    assert config().resume and not config("--no-resume").resume
    import sys

    def ray_started():
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    assert not ray_started()
    first = run(config()).manifest
    assert not ray_started(), "the local executor started Ray"
    assert first.documents == {"ok": 2, "total": 2} and first.pages == {"ok": 3, "total": 3}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet")) == [
        f"documents/part-{first.run_id}-00000.parquet", f"pages/part-{first.run_id}-00000.parquet"]
    again = run(config("--no-resume")).manifest
    assert again.documents == {"ok": 2, "total": 2} and again.counters["documents_read"] == 2
    skipped = run(config()).manifest
    assert skipped.documents == {"total": 0} and skipped.counters["skipped_unchanged_listing"] == 2
    rows = pq.read_table(out / "documents").to_pylist()  # unchanged inputs get no row: their ok rows stand
    assert sorted((r["run_id"], r["status"]) for r in rows) == sorted(
        [(first.run_id, "ok")] * 2 + [(again.run_id, "ok")] * 2)


def test_progress_lines_come_on_time_while_a_page_is_slow(tmp_path):
    """A run held on one page (no batch arrives) still prints a progress line every --progress-interval."""
    import queue
    import threading
    import time

    from tests.conftest import start_cli

    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        doc = pymupdf.open()
        doc.new_page().insert_text((72, 72), name)
        doc.save(tmp_path / "in" / f"{name}.pdf")
    job = tmp_path / "job.yaml"
    job.write_text("executor: local\nprogress: false\n")
    release = tmp_path / "release"
    proc = start_cli("run", tmp_path / "in", "--output", tmp_path / "out", "--config", job, "--model", "tiny-random",
                     "--max-new-tokens", "2", "--progress-interval", "0.1", "--page-timeout", "3600",
                     env={"DOCPIPE_FAULT_RENDER": f"b.pdf@1=until:{release}"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True).start()
    try:
        while not Path(f"{release}.waiting").exists():  # until b.pdf's page is held
            assert proc.poll() is None, "the run ended before b.pdf"
            time.sleep(0.05)
        seen = []
        while len([ln for ln in seen if ln.startswith("docpipe: progress: documents 1/2")]) < 3:
            seen.append(lines.get(timeout=120))  # a safety net: on time, a line comes every 0.1 s
    finally:
        release.touch()
    assert proc.wait(timeout=600) == 0


def text_pdf(path, text: str) -> None:
    """A one-page PDF whose text layer the router trusts: the model is never needed for it."""
    doc = pymupdf.open()
    page = doc.new_page()
    for i in range(8):
        page.insert_text((72, 72 + 16 * i), f"{text}: line {i + 1} of a born-digital page, read from its text layer")
    doc.save(path)


@pytest.fixture
def nothing_loads_a_model(monkeypatch):
    """Loading the model, resolving it, or starting Ray fails the test at once."""
    import docpipe.execute.plan
    import docpipe.execute.run
    import docpipe.model.load

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was called")
        return fail

    monkeypatch.setattr(docpipe.model.load, "load_model", forbidden("load_model"))
    monkeypatch.setattr(docpipe.execute.plan, "init_ray", forbidden("init_ray"))
    return monkeypatch


def test_failures_for_good_are_remembered_and_a_rerun_with_nothing_new_reads_nothing_and_starts_nothing(
        tmp_path, nothing_loads_a_model):
    """An empty file, an encrypted PDF and a text file named .pdf fail for good: a rerun does not read them (nor the
    ok file), starts no Ray and loads no model, and writes no row; --retry-failed reads them again. Meanwhile a run
    whose pages all come from the text layer never loads the model; the summary names error types, the filtered
    file, what was skipped unchanged and the run's record."""
    import io

    import docpipe.execute.run
    from docpipe.cli import print_summary
    from docpipe.config import RunConfig
    from docpipe.execute.run import run
    from tests.bad_inputs import CORPUS

    inbox = tmp_path / "in"
    inbox.mkdir()
    text_pdf(inbox / "REPORT.PDF", "report")  # the include glob below is lower case
    (inbox / "empty.pdf").write_bytes(b"")
    (inbox / "notes.pdf").write_bytes(b"plain text, not a document\n")
    (inbox / "locked.pdf").write_bytes(CORPUS["encrypted.pdf"][0]())
    (inbox / "README.txt").write_text("filtered out")
    config = RunConfig(inputs=[str(inbox)], output=str(tmp_path / "out"), include=["*.pdf"], executor="local",
                       model={"name": "tiny-random"})
    first = run(config)
    m = first.manifest
    assert m.documents == {"ok": 1, "error": 3, "total": 4} and m.counters["pages_text_layer"] == 1
    assert m.errors == {"empty_file": 1, "encrypted_document": 1, "unsupported_media_type": 1}
    assert m.filtered == [str(inbox / "README.txt")] and m.counters["listing_filtered_out"] == 1
    summary = io.StringIO()
    print_summary(first, summary)
    lines = summary.getvalue().splitlines()
    assert "errors     empty_file 1, encrypted_document 1, unsupported_media_type 1" in lines
    assert "filtered   1 by --include/--exclude: README.txt" in lines
    assert lines[-1] == f"record     {tmp_path / 'out'}/_runs/{m.run_id}.json" and first.record == lines[-1][11:]

    # nothing new, on the Ray executor: not even the model's name is resolved, and Ray never starts
    resolve = docpipe.execute.run.resolve_checkpoint
    nothing_loads_a_model.setattr(docpipe.execute.run, "resolve_checkpoint", lambda name: 1 / 0)
    again = run(config.model_copy(update={"executor": "ray"}))
    c = again.manifest.counters
    assert again.manifest.documents == {"total": 0} and (c["documents_read"], c["bytes_read"]) == (0, 0)
    assert (c["skipped_unchanged_listing"], c["skipped_failed_unchanged"]) == (1, 3)
    summary = io.StringIO()
    print_summary(again, summary)
    assert ("unchanged  4 not read: 1 ok before, 3 failed for good before (--retry-failed reads them)"
            in summary.getvalue().splitlines())
    assert {r["run_id"] for r in pq.read_table(tmp_path / "out" / "documents").to_pylist()} == {m.run_id}

    nothing_loads_a_model.setattr(docpipe.execute.run, "resolve_checkpoint", resolve)
    retried = run(config.model_copy(update={"retry_failed": True})).manifest  # back on the local executor
    assert retried.documents == {"error": 3, "total": 3} and retried.counters["documents_read"] == 3
    assert retried.counters["skipped_unchanged_listing"] == 1


def test_a_model_named_as_a_missing_folder_and_a_failed_start_leave_no_output(tmp_path, sample_docs):
    from docpipe.config import RunConfig
    from docpipe.errors import ConfigError, FatalError
    from docpipe.execute.run import run

    inputs = [str(sample_docs / "receipt.png")]
    with pytest.raises(ConfigError, match=r"^no such model folder: \./nosuch-model$"):
        run(RunConfig(inputs=inputs, output=str(tmp_path / "a"), model={"name": "./nosuch-model"}))
    assert not (tmp_path / "a").exists()
    # a model whose processor cannot be read: found once the lease is taken, and OUT (new, or empty before) is left
    # as it was, without empty folders or the lease's lock file
    (tmp_path / "broken-model").mkdir()
    (tmp_path / "broken-model" / "config.json").write_text(  # a supported architecture: its processor is what fails
        json.dumps({"architectures": ["Idefics2ForConditionalGeneration"], "model_type": "idefics2"}))
    (tmp_path / "broken-model" / "preprocessor_config.json").write_text("{not json")
    (tmp_path / "c").mkdir()
    for out in ("b", "c"):
        with pytest.raises(FatalError, match="cannot read the image processor of .*broken-model"):
            run(RunConfig(inputs=inputs, output=str(tmp_path / out), executor="local",
                          model={"name": str(tmp_path / "broken-model")}))
    assert not (tmp_path / "b").exists() and list((tmp_path / "c").iterdir()) == []


def test_help_shows_examples():
    from docpipe.cli import build_parser

    parser = build_parser()
    assert "examples:\n  docpipe run scans/ -o out/" in parser.format_help()
    [sub] = [a for a in parser._actions if a.dest == "command"]
    for name in ("run", "submit", "eval", "report", "finetune"):
        assert f"examples:\n  docpipe {name} " in sub.choices[name].format_help().replace("docpipe run forms", "")


def test_sigint_seals_finished_documents_and_a_rerun_redoes_nothing_sealed(tmp_path, local_job):
    """Ctrl-C while the third document renders: the two finished ones are sealed, the run is recorded as
    interrupted (exit 130); the rerun reads only the third."""
    import signal
    import time

    from tests.conftest import start_cli

    inbox = tmp_path / "in"
    inbox.mkdir()
    for name in ("a", "b", "c"):
        text_pdf(inbox / f"{name}.pdf", name)
    out, hold = tmp_path / "out", tmp_path / "hold"
    args = ["run", inbox, "--output", out, "--config", local_job, "--model", "tiny-random", "--no-progress"]
    proc = start_cli(*args, env={"DOCPIPE_FAULT_RENDER": f"c.pdf@1=until:{hold}"})
    try:
        deadline = time.monotonic() + 300  # a safety net: the event is the file the held render writes
        while not hold.with_name("hold.waiting").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        hold.touch()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    [manifest_path] = (out / "_runs").glob("*.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "interrupted" and manifest["documents"] == {"ok": 2, "total": 2}
    assert stderr.strip().splitlines()[-1] == (f"docpipe: interrupted (SIGINT): 2 finished documents sealed, run "
                                               f"record {manifest_path}; a rerun does the rest")
    assert not list(out.rglob("_tmp-*"))  # sealed, not left half-written
    sealed = {d["source_uri"].rsplit("/", 1)[-1] for d in pq.read_table(out / "documents").to_pylist()}
    assert sealed == {"a.pdf", "b.pdf"}

    from docpipe.config import RunConfig
    from docpipe.execute.run import run

    rerun = run(RunConfig(inputs=[str(inbox)], output=str(out), executor="local", model={"name": "tiny-random"},
                          render={"document_timeout_s": None, "page_timeout_s": None}))  # no render process here
    m = rerun.manifest
    assert m.status == "finished" and m.documents == {"ok": 1, "total": 1}
    assert (m.counters["documents_read"], m.counters["skipped_unchanged_listing"]) == (1, 2)


def test_sigterm_waits_for_a_write_to_end_and_exits_143(monkeypatch, capsys):
    """SIGTERM (a scheduler stopping the job) ends a run as Ctrl-C does, never in the middle of writing records."""
    import os
    import signal

    import docpipe.execute.run
    from docpipe.cli import main
    from docpipe.execute.run import Interrupted, _signals_end_run

    written = False
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's own where this worker started Ray before
    with pytest.raises(Interrupted) as stopped:
        with _signals_end_run() as stop:
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGTERM)  # delivered here, raised once the block is done
                written = True
    assert written and stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handlers are gone with it, the one before is back

    def interrupted(config):
        exc = Interrupted(signal.SIGTERM)
        exc.record, exc.documents = "out/_runs/r1.json", 3
        raise exc

    monkeypatch.setattr(docpipe.execute.run, "run", interrupted)
    assert main(["run", "in", "--output", "out"]) == 143
    assert capsys.readouterr().err.strip() == ("docpipe: interrupted (SIGTERM): 3 finished documents sealed, run "
                                               "record out/_runs/r1.json; a rerun does the rest")


def test_ray_log_lines_go_to_a_file_and_docpipe_lines_stay_on_stderr(tmp_path, monkeypatch, capfd):
    """What Ray writes while docpipe prints its own progress (its core to file descriptor 2, its loggers, which it
    makes anew at init) lands in the log file; docpipe's own lines stay on stderr. (Its warnings module's lines, which
    pytest records instead of printing, are test_a_model_that_cannot_be_loaded_is_fatal_with_exit_2's.)"""
    import logging
    import os
    import sys

    from docpipe.execute.cluster import ray_logs_to_file

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    logger = logging.getLogger("ray.docpipe_test")
    with ray_logs_to_file(True) as path:
        os.write(2, b"[E core_worker.cc:1] an actor warning\n")
        handler = logging.StreamHandler()  # bound to sys.stderr now, as Ray's are
        logger.addHandler(handler)
        try:
            logger.warning("Token authentication is enabled")
        finally:
            logger.removeHandler(handler)
        print("docpipe: progress: documents 1/2", file=sys.stderr)
    err = capfd.readouterr().err.splitlines()
    assert err == ["docpipe: progress: documents 1/2"] and path.startswith(str(tmp_path / "docpipe-logs" / "ray-"))
    log = open(path).read()
    assert "an actor warning" in log and "Token authentication" in log
