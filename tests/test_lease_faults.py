"""The lease (pipeline/output/lease.py) under the failures real outputs see, in-process: lost responses (a store and
moto's server over HTTP behind tests/faulty_proxy.py), stores that ignore conditional deletes or writes (MinIO's
DeleteObject, emulated by dropping the header), clocks that disagree or stop, killed holders not yet reaped, reused
pids, mounts without hard links, and the heartbeat across several expiries."""

import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from docpipe.config import StorageOptions
from docpipe.output.lease import (LEASE_NAME, Lease, LeaseLost, LeaseUnsupported, LocalStore, S3Store, machine_key,
                                  parse, s3_client)
from tests.faulty_proxy import FaultyProxy
from tests.test_lease import Clock, FailingRenewals, plant, stale_lease

BOUND = 60  # a safety net only: the waits below end on an event


def wait_for(predicate, what: str):
    deadline = time.monotonic() + BOUND
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def lease_at(folder) -> dict:
    return json.loads((folder / LEASE_NAME).read_bytes())


# --- lost responses ---------------------------------------------------------------------------------------------

class LostResponses(LocalStore):
    """A store whose next writes go through but whose answers are lost: "raise" (the request failed, as far as the
    client knows) or "refused" (a retry of it met the write itself, 412)."""

    def __init__(self, folder, losses):
        super().__init__(folder)
        self.losses = list(losses)

    def replace(self, data, version):
        answer = super().replace(data, version)
        if answer is not None and self.losses:
            if self.losses.pop(0) == "raise":
                raise ConnectionResetError(104, "Connection reset by peer")
            return None
        return answer


def test_a_renewal_whose_response_was_lost_keeps_the_lease(tmp_path, capsys):
    """The renewal went through; this run did not hear so. Its next step finds its own record and adopts it,
    instead of declaring its lease "taken over by run <itself>"."""
    lease = Lease(LostResponses(str(tmp_path), ["raise", "refused"]), "run-1", expiry_s=60)
    assert lease.try_acquire() is None
    first = lease.version
    assert lease._beat()  # landed, answer lost: a warning, and this run still holds its old version
    assert "renewing the output's lease failed (ConnectionResetError" in capsys.readouterr().err
    assert lease.version == first and lease_at(tmp_path)["expires_at"] > json.loads(first)["expires_at"]
    lease.renew()  # 412 on the old version: the record is ours, adopted, and renewed from it (lost again: 412)
    lease.renew()  # and once more, answered
    assert lease.lost is None and lease.version == (tmp_path / LEASE_NAME).read_text()
    lease.check()
    assert Lease(LocalStore(str(tmp_path)), "run-2", expiry_s=60).try_acquire().run_id == "run-1"
    lease.release()
    assert not (tmp_path / LEASE_NAME).exists()


@pytest.fixture(scope="module")
def bucket(s3):
    s3.create_bucket(Bucket="lease-faults")
    return "lease-faults"


@pytest.fixture
def aws_env(s3_env, monkeypatch):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    return s3_env


def through(proxy: FaultyProxy, key: str) -> S3Store:
    return S3Store("lease-faults", key, s3_client(StorageOptions(endpoint_url=proxy.url), expiry_s=60))


def drop(headers: dict, *names: str) -> None:
    for name in [k for k in headers if k.lower() in names]:
        del headers[name]


def test_a_renewal_whose_response_is_lost_over_http_keeps_the_lease(bucket, s3, aws_env):
    """moto behind a proxy that applies the first renewal (a PUT with If-Match) and then resets the connection:
    botocore retries it and gets 412 (the ETag moved on); the lease stays this run's."""
    lost = []

    def lose_first_renewal(method, path, headers):
        if method == "PUT" and any(k.lower() == "if-match" for k in headers) and not lost:
            lost.append(path)
            return "lost"
        return None

    key = "lost-response/" + LEASE_NAME
    with FaultyProxy(aws_env["AWS_ENDPOINT_URL"], rule=lose_first_renewal) as proxy:
        lease = Lease(through(proxy, key), "run-1", expiry_s=60)
        assert lease.try_acquire() is None
        assert lease._beat()  # the heartbeat's step
        assert lost and proxy.resets == 1
        lease.renew()
        assert lease.lost is None and lease.version == s3.head_object(Bucket=bucket, Key=key)["ETag"]
        assert parse(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).run_id == "run-1"
        lease.check()
        lease.release()
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket=bucket, Key=key)


# --- stores without the primitives -----------------------------------------------------------------------------

def test_a_store_that_ignores_conditional_deletes_cannot_let_a_third_run_in(bucket, s3, aws_env):
    """MinIO deletes an object whatever If-Match says (minio/minio#21677), emulated by dropping the header. Run A
    stalls, B takes its lease over; A then finishes and gives its lease back: it must not delete B's, or C gets
    in while B still runs."""
    deletes = []

    def minio(method, path, headers):
        if method == "DELETE":
            deletes.append(path)
            drop(headers, "if-match")
        return None

    key = "minio/" + LEASE_NAME
    with FaultyProxy(aws_env["AWS_ENDPOINT_URL"], rule=minio) as proxy:
        s3.put_object(Bucket=bucket, Key="minio/scratch", Body=b"x")
        through(proxy, "minio/scratch").delete('"00000000000000000000000000000000"')
        assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="minio/scratch")  # the emulation holds

        a = Lease(through(proxy, key), "run-A", expiry_s=60)
        assert a.try_acquire() is None
        clock = Clock()
        b = Lease(through(proxy, key), "run-B", expiry_s=60, clock=clock)
        assert b.try_acquire().run_id == "run-A"
        clock.now += 61.5  # B has seen A's lease unchanged past its expiry: A's host stalled
        assert b.try_acquire() is None and b.took_over.run_id == "run-A"
        deletes.clear()
        with pytest.raises(LeaseLost, match="taken over by run run-B"):
            a.release()  # its renewal (If-Match on its old ETag) fails first: it deletes nothing
        a.release()  # and never touches the lease again
        assert deletes == []
        assert Lease(through(proxy, key), "run-C", expiry_s=60).try_acquire().run_id == "run-B"
        b.release()
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket=bucket, Key=key)


@pytest.mark.parametrize("ignored,says", [
    (("if-none-match",), r"ignores If-None-Match: \* on PutObject \(it replaced an existing object\)"),
    (("if-match",), r"wrote an object for a PUT with If-Match although none existed \(MinIO before its fix of "
                    r"minio/minio#21526"),
], ids=["if-none-match", "if-match"])
def test_a_store_that_ignores_conditional_writes_is_found_at_start(bucket, s3, aws_env, ignored, says):
    def ignore(method, path, headers):
        if method == "PUT":
            drop(headers, *ignored)
        return None

    with FaultyProxy(aws_env["AWS_ENDPOINT_URL"], rule=ignore) as proxy:
        with pytest.raises(LeaseUnsupported, match=says):
            through(proxy, "ignored/" + LEASE_NAME).probe()
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="ignored/")  # its scratch object removed


def test_a_run_on_a_store_without_conditional_writes_stops_in_one_line(bucket, s3, aws_env, tmp_path):
    import pymupdf

    from docpipe.config import RunConfig
    from docpipe.errors import OutputError
    from docpipe.execute.run import run

    def ignore(method, path, headers):
        if method == "PUT":
            drop(headers, "if-none-match", "if-match")
        return None

    (tmp_path / "in").mkdir()
    doc = pymupdf.open()
    doc.new_page()
    doc.save(tmp_path / "in" / "a.pdf")
    with FaultyProxy(aws_env["AWS_ENDPOINT_URL"], rule=ignore) as proxy:
        with pytest.raises(OutputError) as error:
            run(RunConfig(inputs=[str(tmp_path / "in")], output=f"s3://{bucket}/no-conditions", executor="local",
                          progress=False, storage=StorageOptions(endpoint_url=proxy.url)))
    assert str(error.value).startswith(f"output s3://{bucket}/no-conditions cannot hold a lease: the store at "
                                       f"{proxy.url} (bucket {bucket}) wrote an object for a PUT with If-Match")
    assert "\n" not in str(error.value)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="no-conditions/").get("Contents", [])]
    assert not [k for k in keys if LEASE_NAME in k], keys  # no lease, no scratch object left


def test_a_mount_without_hard_links_takes_the_lease_by_exclusive_create(tmp_path, monkeypatch):
    """SMB without Unix extensions (and some FUSE mounts) refuse hard links: the probe finds it and the lease is
    created with O_EXCL instead; a half-written lease is waited on, not taken over."""
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    stores = [LocalStore(str(tmp_path)) for _ in range(8)]
    for store in stores:
        store.probe()
    assert not any(store.links for store in stores)
    leases = [Lease(store, f"run-{i}", expiry_s=60) for i, store in enumerate(stores)]
    with ThreadPoolExecutor(8) as pool:
        holders = list(pool.map(lambda lease: lease.try_acquire(), leases))
    [winner] = [lease for lease, holder in zip(leases, holders) if holder is None]
    assert {h.run_id for h in holders if h is not None} <= {winner.run_id, ""}  # "": caught half-written
    assert lease_at(tmp_path)["run_id"] == winner.run_id
    winner.release()

    (tmp_path / LEASE_NAME).write_bytes(b'{"run_id": "half-writ')  # a creator between open and write
    busy = Lease(LocalStore(str(tmp_path)), "run-9", expiry_s=60).try_acquire()
    assert busy is not None and "half written" in busy.describe()
    plant(tmp_path, b'{"run_id": "half-writ', age_s=62)  # its creator died there
    taker = Lease(LocalStore(str(tmp_path)), "run-9", expiry_s=60)
    assert taker.try_acquire() is None and lease_at(tmp_path)["run_id"] == "run-9"


# --- clocks ----------------------------------------------------------------------------------------------------

def test_expiry_is_judged_by_the_stores_clock_not_the_holders(tmp_path):
    """A holder whose clock runs an hour behind writes an expires_at already past by ours: its lease was written
    just now by the store's clock, so it is live. One whose clock runs an hour ahead, dead for two expiries by the
    store's clock, is taken over although its expires_at is an hour away."""
    behind = Lease(LocalStore(str(tmp_path)), "run-1", expiry_s=60, wall=lambda: time.time() - 3600)
    assert behind.try_acquire() is None
    assert lease_at(tmp_path)["expires_at"] < time.time() - 3000
    busy = Lease(LocalStore(str(tmp_path)), "run-2", expiry_s=60).try_acquire()
    assert busy.run_id == "run-1" and 30 < busy.expires_at - time.time() <= 61  # told by our clock

    plant(tmp_path, stale_lease("another-host", 1, time.time() + 3600, expiry_s=60), age_s=121)
    taker = Lease(LocalStore(str(tmp_path)), "run-2", expiry_s=60)
    assert taker.try_acquire() is None and taker.took_over.run_id == "dead-run"


def test_expiry_on_s3_is_judged_by_s3s_clock(bucket, s3, aws_env):
    """S3's Date minus Last-Modified. A holder an hour behind is live; one an hour ahead, with a 0.2 s expiry, is
    taken over once S3 says its lease is older than that (and the stamps' second), by fresh readers who have not
    watched it themselves (about two seconds)."""
    key = "skew/" + LEASE_NAME
    store = lambda: S3Store(bucket, key, s3_client(expiry_s=60))  # noqa: E731
    behind = Lease(store(), "run-1", expiry_s=60, wall=lambda: time.time() - 3600)
    assert behind.try_acquire() is None
    assert Lease(store(), "run-2", expiry_s=60).try_acquire().run_id == "run-1"
    s3.delete_object(Bucket=bucket, Key=key)

    ahead = Lease(store(), "run-1", expiry_s=0.2, wall=lambda: time.time() + 3600)
    assert ahead.try_acquire() is None
    takers = []

    def taken() -> bool:
        takers.append(Lease(store(), "run-2", expiry_s=60))
        return takers[-1].try_acquire() is None

    wait_for(taken, "S3's clock passing the lease's expiry")
    assert takers[-1].took_over.run_id == "run-1"
    s3.delete_object(Bucket=bucket, Key=key)


def test_a_holder_checks_its_wall_clock_too(tmp_path):
    """A paused VM: the monotonic clock stood still for an hour, the wall clock did not. Before its next write the
    holder renews (a conditional write: nobody took the lease over), or, when somebody did, stops."""
    mono, wall = Clock(), Clock()
    wall.now = time.time()
    lease = Lease(LocalStore(str(tmp_path)), "run-1", expiry_s=60, clock=mono, wall=wall)
    assert lease.try_acquire() is None
    wall.now += 3600
    lease.check()
    assert lease_at(tmp_path)["expires_at"] == wall.now + 60  # renewed by check() itself
    wall.now += 3600
    plant(tmp_path, stale_lease("another-host", 1, time.time() + 3600))  # taken over during the pause
    with pytest.raises(LeaseLost, match="taken over by run dead-run"):
        lease.check()

    failing = Lease(FailingRenewals(str(tmp_path / "sub")), "run-2", expiry_s=60, clock=mono, wall=wall)
    (tmp_path / "sub").mkdir()
    assert failing.try_acquire() is None
    wall.now += 51  # past 5/6 of the expiry by the wall clock alone; the renewal fails: stop
    with pytest.raises(LeaseLost, match="could not be renewed for 51 s"):
        failing.check()


class AgedStore(LocalStore):
    """The lease read as last written ``age_s`` ago, by a store clock the test sets: a reader's verdict on a lease with
    a short expiry must not depend on how promptly a loaded machine schedules this process (or the holder's
    heartbeat) between the write and the read."""

    def __init__(self, folder, age_s: float):
        super().__init__(folder)
        self.age_s = age_s

    def read(self):
        seen = super().read()
        return seen and dataclasses.replace(seen, age_s=self.age_s)


def test_the_heartbeat_renews_across_several_expiries(tmp_path):
    """A 0.6 s expiry, renewed every 0.2 s by the heartbeat thread: ten renewals span more than three expiries, each
    one this run's, and at each another run (seeing the lease a whole expiry old) is refused; the holder may still
    write at the end. Watched read-only: a watcher that tried to take the lease would win it, rightly, whenever the
    heartbeat were starved for longer than the expiry, and the outcome would depend on the machine's load."""
    expiry = 0.6
    holder = Lease(LocalStore(str(tmp_path)), "run-1", expiry_s=expiry)
    holder.acquire(None, poll_s=0.1)
    try:
        seen = [(tmp_path / LEASE_NAME).read_bytes()]
        while len(seen) < 11:
            wait_for(lambda: (tmp_path / LEASE_NAME).read_bytes() != seen[-1], "a renewal")
            seen.append((tmp_path / LEASE_NAME).read_bytes())
            assert parse(seen[-1]).run_id == "run-1"
            other = Lease(AgedStore(str(tmp_path), age_s=expiry), "run-2", expiry_s=expiry, clock=Clock())
            busy = other.try_acquire()
            assert busy is not None and busy.run_id == "run-1" and other.version is None
        expiries = [parse(data).expires_at for data in seen]
        # each renewal waits a beat (expiry / 3) after the last: ten of them, at least 2 s of expiries
        assert expiries == sorted(expiries) and expiries[-1] - expiries[0] >= 3 * expiry
        holder.check()
    finally:
        holder.release()
    assert not (tmp_path / LEASE_NAME).exists()


# --- holders that are gone --------------------------------------------------------------------------------------

HOLD = """import sys
from docpipe.output.lease import Lease, LocalStore
Lease(LocalStore(sys.argv[1]), "killed-run", 3600).acquire(None, 0.1)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_killed_holder_not_yet_reaped_is_gone_at_once(tmp_path):
    """SIGKILLed, its parent (here: this test) not having waited for it yet: a zombie. os.kill(pid, 0) still
    succeeds on it; the lease counts it as gone (by its state, and its exit begun with SIGKILL pending)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"
        assert Lease(LocalStore(str(tmp_path)), "run-2", expiry_s=3600).try_acquire().run_id == "killed-run"
        os.kill(child.pid, signal.SIGKILL)
        wait_for(lambda: open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", "a zombie")
        os.kill(child.pid, 0)  # still there for os.kill
        taker = Lease(LocalStore(str(tmp_path)), "run-2", expiry_s=3600)
        assert taker.try_acquire() is None and taker.took_over.pid == child.pid
    finally:
        child.kill()
        child.wait()


def test_a_holders_pid_reused_by_another_process_is_gone(tmp_path):
    """The lease records when its holder's process started: the same pid started at another time (this test's
    process here) is another process, so the holder is gone."""
    with open("/proc/self/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19])
    for pid_start, live in ((start, True), (start - 1, False)):
        plant(tmp_path, stale_lease(socket.gethostname(), os.getpid(), time.time() + 3600, machine_key(),
                                    pid_start=pid_start))
        taker = Lease(LocalStore(str(tmp_path)), "run-2", expiry_s=3600)
        assert (taker.try_acquire() is not None) == live
