"""One output, one run at a time: the lease on OUT (pipeline/output/lease.py), in-process and with real CLI runs on a
local folder and on S3 (moto's server over HTTP)."""

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pymupdf
import pytest

from docpipe.output.lease import LEASE_NAME, Lease, LeaseBusy, LeaseLost, LocalStore, S3Store, machine_key, parse, s3_client
from tests.conftest import run_cli, start_cli

TIMEOUT = 600  # a safety net only: every wait below ends on an event


def make_pdfs(folder: Path, names=("a", "b", "c", "d"), pages=2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        doc = pymupdf.open()
        for i in range(pages):
            doc.new_page().insert_text((72, 72), f"{name} page {i + 1}")
        doc.save(folder / f"{name}.pdf")
        paths.append(folder / f"{name}.pdf")
    return paths


def wait_for(predicate, what: str):
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def job_file(tmp_path: Path) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text("executor: local\nprogress: false\n")  # the lease is the subject; Ray adds nothing
    return job


def run_args(inputs: Path, out, job: Path, *extra):
    return ("run", inputs, "--output", out, "--config", job, "--model", "tiny-random", "--max-new-tokens", "2",
            "--page-timeout", "3600", "--document-timeout", "3600", *extra)


def ok_once(docs: list[dict], pdfs: list[Path]) -> None:
    """Every document ok exactly once across the output's runs (later runs skip them unchanged, with no row)."""
    ok = Counter(r["source_uri"] for r in docs if r["status"] == "ok")
    assert ok == Counter({str(p): 1 for p in pdfs}), docs


# --- the lease itself, in-process ---------------------------------------------------------------------------

def test_a_live_lease_is_refused_and_a_released_one_taken(tmp_path):
    first = Lease(LocalStore(str(tmp_path)), "run-1", expiry_s=60)
    first.acquire(None, poll_s=0.1)
    holder = parse((tmp_path / LEASE_NAME).read_bytes())
    assert (holder.run_id, holder.host, holder.pid) == ("run-1", socket.gethostname(), os.getpid())
    second = Lease(LocalStore(str(tmp_path)), "run-2", expiry_s=60)
    with pytest.raises(LeaseBusy) as busy:
        second.acquire(None, poll_s=0.1)
    assert busy.value.holder.run_id == "run-1"
    first.renew()  # the heartbeat's step: a later expiry, same holder
    assert parse((tmp_path / LEASE_NAME).read_bytes()).expires_at > holder.expires_at
    first.release()
    assert not (tmp_path / LEASE_NAME).exists()
    second.acquire(None, poll_s=0.1)
    assert parse((tmp_path / LEASE_NAME).read_bytes()).run_id == "run-2" and second.took_over is None
    second.release()


def stale_lease(host: str, pid: int, expires_at: float, machine: str | None = None, **more) -> bytes:
    """A lease left by run "dead-run"; ``machine`` None: an older lease without the machine key."""
    fields = {"run_id": "dead-run", "host": host, "pid": pid, "started_at": "2026-01-01T00:00:00Z",
              "expires_at": expires_at, **more}
    return json.dumps(fields if machine is None else {**fields, "machine": machine}).encode()


def plant(folder: Path, data: bytes, age_s: float = 0.0) -> None:
    """Write a lease into ``folder``, last written ``age_s`` ago by the store's clock (its mtime)."""
    path = folder / LEASE_NAME
    path.write_bytes(data)
    if age_s:
        then = path.stat().st_mtime - age_s
        os.utime(path, (then, then))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_takeover_is_atomic_locally(tmp_path):
    """Eight runs wait on one dead holder's lease at once: exactly one takes it over."""
    plant(tmp_path, stale_lease(socket.gethostname(), dead_pid(), time.time() + 3600, machine_key()))
    leases = [Lease(LocalStore(str(tmp_path)), f"run-{i}", expiry_s=60) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        holders = list(pool.map(lambda lease: lease.try_acquire(), leases))
    winners = [lease for lease, holder in zip(leases, holders) if holder is None]
    assert len(winners) == 1 and winners[0].took_over.run_id == "dead-run"
    assert {h.run_id for h in holders if h is not None} == {winners[0].run_id}  # the others see the winner
    assert parse((tmp_path / LEASE_NAME).read_bytes()).run_id == winners[0].run_id


def test_a_lease_from_another_host_is_taken_only_after_its_expiry(tmp_path):
    """By the store's clock (the file's mtime): 30 s old is live, 62 s old has expired (60 s, plus a second for
    the stores' whole-second stamps); the holder's own expires_at is not trusted. (The live one is well inside the
    expiry: its age grows while this test runs, and a loaded machine may pause it for seconds.)"""
    for expires_at in (time.time() - 3600, time.time() + 3600):
        plant(tmp_path, stale_lease("another-host", 1, expires_at), age_s=30)
        assert Lease(LocalStore(str(tmp_path)), "run-1", expiry_s=60).try_acquire().run_id == "dead-run"
    plant(tmp_path, stale_lease("another-host", 1, time.time() + 3600), age_s=62)
    lease = Lease(LocalStore(str(tmp_path)), "run-1", expiry_s=60)
    assert lease.try_acquire() is None and lease.took_over.host == "another-host"
    # The holder's expiry, where its lease records one, not the reader's: 10 s
    plant(tmp_path, stale_lease("another-host", 1, time.time() + 3600, expiry_s=10), age_s=12)
    lease = Lease(LocalStore(str(tmp_path)), "run-2", expiry_s=60)
    assert lease.try_acquire() is None and lease.took_over.run_id == "dead-run"


def test_a_dead_pid_on_this_host_name_but_another_machine_waits_for_the_expiry(tmp_path):
    """Containers sharing one host name have separate PID namespaces: a pid missing here may be alive there. Only
    host name and machine key together mean "this machine"; a lease without the key is another machine's."""
    assert machine_key()  # readable here (Linux): otherwise every lease would count as another machine's
    pid = dead_pid()
    for machine in ("another-boot/4026531836", None):
        plant(tmp_path, stale_lease(socket.gethostname(), pid, time.time() + 3600, machine))
        assert Lease(LocalStore(str(tmp_path)), "run-1", expiry_s=60).try_acquire().run_id == "dead-run"
        plant(tmp_path, stale_lease(socket.gethostname(), pid, time.time() + 3600, machine), age_s=62)
        lease = Lease(LocalStore(str(tmp_path)), "run-1", expiry_s=60)
        assert lease.try_acquire() is None and lease.took_over.run_id == "dead-run"
    # The same lease with this machine's key: taken over at once, written just now.
    plant(tmp_path, stale_lease(socket.gethostname(), pid, time.time() + 3600, machine_key()))
    lease = Lease(LocalStore(str(tmp_path)), "run-1", expiry_s=60)
    assert lease.try_acquire() is None and lease.took_over.run_id == "dead-run"


class FailingRenewals(LocalStore):
    """A store whose writes fail once the lease is taken (a full disk, an NFS hiccup, S3 timeouts)."""

    def replace(self, data, version):
        raise OSError(28, "No space left on device")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_run_whose_renewals_keep_failing_learns_its_lease_is_lost(tmp_path, capsys):
    """No renewal has gone through for nearly the expiry and the one check() tries then fails too: another run may
    take the lease over at any moment, so check() says lost (a sixth of the expiry early) even though nobody has
    taken it over yet."""
    clock = Clock()
    lease = Lease(FailingRenewals(str(tmp_path)), "run-1", expiry_s=60, clock=clock)
    assert lease.try_acquire() is None
    clock.now += 20
    assert lease._beat()  # the heartbeat's step: it fails, says so, and goes on
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("docpipe: warning: renewing the output's lease failed (OSError: ") and "No space" in line
    clock.now += 29.9
    lease.check()  # 49.9 s since the lease was written: within 60 - 60/6
    clock.now += 0.2
    with pytest.raises(LeaseLost, match="could not be renewed for 50 s"):
        lease.check()
    with pytest.raises(LeaseLost):
        lease.check()  # and stays lost
    lease.release()  # a lost lease is never touched again (another run may be taking it over): it expires
    assert parse((tmp_path / LEASE_NAME).read_bytes()).run_id == "run-1"


def test_a_lease_whose_create_went_through_unseen_is_adopted(tmp_path):
    """A create whose response was lost, retried by the client, gets 412: the lease found then is this run's own
    and is taken, not refused as another run's."""
    lease = Lease(LocalStore(str(tmp_path)), "run-1", expiry_s=60)
    (tmp_path / LEASE_NAME).write_bytes(lease._content())  # the first attempt landed
    assert lease.try_acquire() is None and lease.took_over is None
    lease.renew()  # with the version just read
    assert parse((tmp_path / LEASE_NAME).read_bytes()).run_id == "run-1"
    lease.release()
    assert not (tmp_path / LEASE_NAME).exists()


def test_a_holder_whose_lease_was_taken_over_learns_it(tmp_path):
    first = Lease(LocalStore(str(tmp_path)), "run-1", expiry_s=60)
    assert first.try_acquire() is None
    plant(tmp_path, stale_lease("another-host", 1, time.time() + 3600))  # as a takeover would
    with pytest.raises(LeaseLost, match="taken over by run dead-run"):
        first.renew()
    first.release()  # lost: left to its new holder
    assert parse((tmp_path / LEASE_NAME).read_bytes()).run_id == "dead-run"


@pytest.fixture(scope="module")
def lease_bucket(s3):
    s3.create_bucket(Bucket="leases")
    return "leases"


def test_s3_lease_uses_conditional_writes(lease_bucket, s3, s3_env, monkeypatch):
    """moto's server honours If-None-Match and If-Match on PutObject (checked here over HTTP, as AWS and MinIO)."""
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    store = lambda: S3Store(lease_bucket, "out/" + LEASE_NAME, s3_client())  # noqa: E731
    store().probe()  # moto honours the conditions the lease needs
    first = Lease(store(), "run-1", expiry_s=60)
    first.acquire(None, poll_s=0.1)
    with pytest.raises(LeaseBusy):
        Lease(store(), "run-2", expiry_s=60).acquire(None, poll_s=0.1)
    first.renew()
    first.release()
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket=lease_bucket, Key="out/" + LEASE_NAME)

    # The conditions themselves, one request at a time (moto's check-and-write is not atomic under its threaded
    # server, so a concurrent race there would prove nothing about S3; the local flock test races for real).
    key = "out/" + LEASE_NAME
    s3.put_object(Bucket=lease_bucket, Key=key, Body=stale_lease("another-host", 1, time.time() - 1))
    stale_etag = s3.head_object(Bucket=lease_bucket, Key=key)["ETag"]
    assert store().create(b"{}") is None  # If-None-Match: * with a lease there
    clock = Clock()
    taker = Lease(store(), "run-3", expiry_s=60, clock=clock)
    assert taker.try_acquire().run_id == "dead-run"  # written just now by S3's clock, whatever its expires_at
    clock.now += 61.5  # seen unchanged for longer than the expiry (plus a second), by the taker's own clock
    assert taker.try_acquire() is None and taker.took_over.run_id == "dead-run"  # If-Match on the stale ETag
    assert store().replace(b"{}", stale_etag) is None  # a second taker with the same stale ETag loses
    store().delete(stale_etag)  # and cannot delete the winner's lease either
    assert parse(s3.get_object(Bucket=lease_bucket, Key=key)["Body"].read()).run_id == "run-3"
    taker.release()
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket=lease_bucket, Key=key)


def test_s3_lease_deleted_under_its_holder_counts_as_lost(lease_bucket, s3, s3_env, monkeypatch):
    """If-Match on a deleted object answers 404 NoSuchKey: a failed condition, not a store error."""
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    key = "deleted/" + LEASE_NAME
    lease = Lease(S3Store(lease_bucket, key, s3_client(expiry_s=60)), "run-1", expiry_s=60)
    assert lease.try_acquire() is None
    s3.delete_object(Bucket=lease_bucket, Key=key)  # e.g. a taker that took it over and released it
    assert lease.store.replace(b"{}", lease.version) is None
    with pytest.raises(LeaseLost, match="lease was removed"):
        lease.renew()
    assert not lease._beat() and "removed" in lease.lost  # the heartbeat stops; check() reports it
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()  # nothing there to delete: no error


def test_s3_lease_whose_create_went_through_unseen_is_adopted(lease_bucket, s3, s3_env, monkeypatch):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    key = "adopt/" + LEASE_NAME
    lease = Lease(S3Store(lease_bucket, key, s3_client(expiry_s=60)), "run-1", expiry_s=60)
    s3.put_object(Bucket=lease_bucket, Key=key, Body=lease._content())  # as if our first PUT landed unseen
    assert lease.try_acquire() is None and lease.took_over is None
    assert lease.version == s3.head_object(Bucket=lease_bucket, Key=key)["ETag"]
    lease.renew()
    lease.release()
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket=lease_bucket, Key=key)


def test_the_lease_client_cannot_outlast_the_expiry():
    """One request, retries included, stays well under a third of the expiry (the heartbeat's interval)."""
    config = s3_client(expiry_s=60).meta.config
    assert config.retries["total_max_attempts"] == 2
    assert 2 * (config.connect_timeout + config.read_timeout) <= 60 / 6


# --- real runs ----------------------------------------------------------------------------------------------

def _two_runs(tmp_path, out, read_docs, list_files, env=None, a_args=(), open_files=False):
    """Run A is held inside its third document (after writing the first two); B starts then: refused, and
    with --wait-for-output it waits, A is let go, and B finds everything done."""
    pdfs = make_pdfs(tmp_path / "in")
    job = job_file(tmp_path)
    release = tmp_path / "release-a"
    a = start_cli(*run_args(tmp_path / "in", out, job, *a_args),
                  env={**(env or {}), "DOCPIPE_FAULT_RENDER": f"c.pdf@1=until:{release}"})
    try:
        wait_for(lambda: Path(f"{release}.waiting").exists() or a.poll() is not None, "run A reaching c.pdf")
        assert a.poll() is None, a.communicate()[1][-3000:]
        written = list_files()
        assert written, "run A wrote nothing before its third document"
        if open_files:  # A is writing them: the ones a run removing stale files before its lease would delete
            assert {Path(f).name[:9] for f in written} == {"_tmp-part"}, written

        b = run_cli(*run_args(tmp_path / "in", out, job), env=env)
        assert b.returncode == 2, b.stderr[-3000:]
        [line] = b.stderr.strip().splitlines()
        assert line.startswith(f"docpipe: error: output {out} is in use by run ") and f"pid {a.pid}" in line
        assert f"host {socket.gethostname()}" in line and "its lease expires at " in line
        assert set(written) <= set(list_files())  # B removed nothing of A's, its open files included

        waiter = start_cli(*run_args(tmp_path / "in", out, job, "--wait-for-output", "600"), env=env)
        line = waiter.stderr.readline()
        assert line.startswith("docpipe: waiting for run ") and f"pid {a.pid}" in line, line
        release.touch()
        assert a.wait(TIMEOUT) == 0, a.communicate()[1][-3000:]
        out_b, err_b = waiter.communicate(timeout=TIMEOUT)
        assert waiter.returncode == 0, err_b[-3000:]
    finally:
        release.touch()  # never leave A's render process held
        for proc in (a, locals().get("waiter")):
            if proc is not None and proc.poll() is None:
                proc.kill()
    docs = read_docs()
    ok_once(docs, pdfs)
    by_run = Counter((r["run_id"], r["status"]) for r in docs)
    [run_a] = {r["run_id"] for r in docs if r["status"] == "ok"}
    assert by_run == Counter({(run_a, "ok"): 4})  # B found everything done: nothing read, no row
    assert "documents  0 (none)" in out_b and "unchanged  4 not read: 4 ok before" in out_b
    return pdfs


def test_second_local_run_is_refused_or_waits(tmp_path):
    """A seals nothing before its end (the default checkpoint interval): when B starts, A's rows are in open
    _tmp- files, the ones a run that removed stale files before taking the lease would delete."""
    out = tmp_path / "out"

    def files():
        return sorted(str(p) for p in out.rglob("*.parquet"))

    _two_runs(tmp_path, out, lambda: pq.read_table(out / "documents").to_pylist(), files, open_files=True)
    assert not list(out.rglob("_tmp-*")) and not (out / LEASE_NAME).exists()


def test_second_s3_run_is_refused_or_waits(tmp_path, s3, s3_env, lease_bucket):
    from tests.test_s3 import s3fs

    fs = s3fs(s3_env)

    def files():
        listed = s3.list_objects_v2(Bucket=lease_bucket, Prefix="two-runs/")
        return sorted(o["Key"] for o in listed.get("Contents", []))

    _two_runs(tmp_path, "s3://leases/two-runs", lambda: pq.read_table("leases/two-runs/documents",
                                                                       filesystem=fs).to_pylist(),
              lambda: [k for k in files() if k.endswith(".parquet")], env=s3_env,
              a_args=("--checkpoint-seconds", "0.01"))  # on S3 an open file is invisible: A seals each batch
    assert "two-runs/" + LEASE_NAME not in files()


def test_a_killed_runs_lease_is_taken_over_at_once_on_its_host(tmp_path):
    """A's whole process group is SIGKILLed and B starts at once, before anyone need have reaped A (a zombie
    counts as gone, tests/test_lease_faults.py)."""
    import signal

    out = tmp_path / "out"
    pdfs = make_pdfs(tmp_path / "in")
    job = job_file(tmp_path)
    held = tmp_path / "held"
    a = start_cli(*run_args(tmp_path / "in", out, job), env={"DOCPIPE_FAULT_RENDER": f"c.pdf@1=until:{held}"},
                  new_session=True)
    try:
        wait_for(lambda: Path(f"{held}.waiting").exists() or a.poll() is not None, "run A reaching c.pdf")
        assert a.poll() is None, a.communicate()[1][-3000:]
        assert list(out.rglob("_tmp-part-*"))  # its open files
        assert parse((out / LEASE_NAME).read_bytes()).pid == a.pid
        os.killpg(a.pid, signal.SIGKILL)  # A and its render processes, as an OOM-killed container's
        b = run_cli(*run_args(tmp_path / "in", out, job, "--lease-expiry", "3600"))
    finally:
        if a.poll() is None:
            a.kill()
        a.wait()
        held.touch()  # lets a render process that outlived A finish its page and end
    assert b.returncode == 0, b.stderr[-3000:]
    assert "took over the lease" in b.stderr and f"pid {a.pid}" in b.stderr
    ok_once(pq.read_table(out / "documents").to_pylist(), pdfs)
    assert not list(out.rglob("_tmp-*")) and not (out / LEASE_NAME).exists()
    [manifest] = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert manifest["counters"]["stale_tmp_files_removed"] >= 1


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under OUT but the lease's, with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")
            if p.is_file() and not p.name.startswith(LEASE_NAME)}


def test_a_run_that_loses_its_lease_midway_stops_and_writes_nothing_more(tmp_path):
    """A (a 6 s expiry, renewed every 2 s) is held inside its second document; another run takes its lease over,
    as one would once A's host had stalled past the expiry. A's heartbeat says so at once; from then on A writes
    nothing: its second document is let go, and A stops before writing it, exit 2, its manifest unwritten and the
    new holder's lease untouched."""
    out = tmp_path / "out"
    make_pdfs(tmp_path / "in", names=("a", "c"))
    held = tmp_path / "held"
    a = start_cli(*run_args(tmp_path / "in", out, job_file(tmp_path), "--checkpoint-seconds", "0.01",
                            "--lease-expiry", "6"), env={"DOCPIPE_FAULT_RENDER": f"c.pdf@1=until:{held}"})
    try:
        wait_for(lambda: Path(f"{held}.waiting").exists() or a.poll() is not None, "run A reaching c.pdf")
        assert a.poll() is None, a.communicate()[1][-3000:]
        store, taker = LocalStore(str(out)), Lease(LocalStore(str(out)), "taker-run", expiry_s=3600)
        while True:  # a compare-and-swap, as try_acquire takes a lease over (A renews meanwhile: look again)
            current = store.read()
            assert parse(current.data).pid == a.pid
            if store.replace(taker._content(), current.version):
                break
        lines = []
        while not any("taken over by run taker-run" in line for line in lines):
            lines.append(a.stderr.readline())
            assert lines[-1], f"run A ended without noticing: {lines}"
        assert lines[-1].startswith("docpipe: warning: the output's lease was taken over by run taker-run (host ")
        before = snapshot(out)
        held.touch()
        assert a.wait(TIMEOUT) == 2
        err = a.stderr.read()
    finally:
        held.touch()
        if a.poll() is None:
            a.kill()
    assert err.strip().splitlines()[-1].startswith(
        "docpipe: error: stopped: the output's lease was taken over by run taker-run (host "), err[-3000:]
    assert snapshot(out) == before  # nothing written, sealed or removed after A learned of the loss
    assert not list((out / "_runs").glob("*.json"))
    assert parse((out / LEASE_NAME).read_bytes()).run_id == "taker-run"  # A did not release the taker's lease


def test_a_lease_from_another_host_is_taken_over_after_expiry(tmp_path):
    out = tmp_path / "out"
    pdfs = make_pdfs(tmp_path / "in", names=("a", "b"))
    job = job_file(tmp_path)
    out.mkdir()
    plant(out, stale_lease("another-host", 1, time.time() - 3600))  # its expires_at past by our clock, not by
    refused = run_cli(*run_args(tmp_path / "in", out, job))             # the store's: written just now
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert "in use by run dead-run (host another-host, pid 1," in line
    assert parse((out / LEASE_NAME).read_bytes()).run_id == "dead-run"

    # The same lease, last written 302 s ago by the store's clock (the default expiry is 300 s): taken over.
    plant(out, stale_lease("another-host", 1, time.time() + 3600), age_s=302)
    b = run_cli(*run_args(tmp_path / "in", out, job))
    assert b.returncode == 0, b.stderr[-3000:]
    assert "took over the lease" in b.stderr and "dead-run" in b.stderr
    [manifest] = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    ok_once(pq.read_table(out / "documents").to_pylist(), pdfs)
    assert not (out / LEASE_NAME).exists()


def test_wait_for_output_followed_by_an_input_says_how_to_write_it(capsys):
    from docpipe.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "--wait-for-output", "in.pdf", "--output", "out"])
    assert exit_.value.code == 2
    assert "--wait-for-output: expected SECONDS, got 'in.pdf': write --wait-for-output=SECONDS" \
        in capsys.readouterr().err
    args = build_parser().parse_args(["run", "--wait-for-output=90", "in.pdf", "--output", "out"])
    assert args.wait_for_output == 90.0 and args.inputs == ["in.pdf"]
    assert build_parser().parse_args(["run", "in.pdf", "--output", "out", "--wait-for-output"]).wait_for_output \
        == 24 * 3600.0


def test_a_failing_release_does_not_hide_the_runs_own_error(tmp_path, monkeypatch, capsys):
    """The runner releases the lease in ``finally``: a store error there is a warning, the run's error stays."""
    from docpipe.execute import run as runner
    from docpipe.config import RunConfig

    make_pdfs(tmp_path / "in", names=("a",))

    def run_fails(*args, **kwargs):
        raise RuntimeError("the run's own error")

    def delete_fails(self, version):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(runner, "_run_leased", run_fails)
    monkeypatch.setattr(LocalStore, "delete", delete_fails)
    with pytest.raises(RuntimeError, match="the run's own error"):
        runner.run(RunConfig(inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), executor="local",
                             progress=False))
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"docpipe: warning: could not release the lease on {tmp_path / 'out'}: ") \
        and "Input/output error" in line and "expires within 300 s" in line, line
