"""One run at a time per output: a lease object under OUT naming the run that holds it.

A run takes the lease before it reads earlier results or touches a file, renews it from a heartbeat thread,
and gives it back once its manifest and lake step are done. Two runs writing one output would remove each
other's unfinished files and process every document twice.

The lease is ``OUT/_lease.json`` (readers skip underscore names): holder run id, host, pid, machine key (see
``machine_key``), start time and expiry. It is created atomically: locally by hard-linking a complete file to the
name (fails if it exists), on S3 by a conditional PUT (``If-None-Match: *``). A dead holder's lease is taken over
at once when the holder ran on this machine (same host name and machine key) and its process is gone, otherwise
once it has expired. Taking over is atomic too: locally under an exclusive ``flock`` (released by the kernel if
the taker dies), on S3 by a PUT conditional on the stale lease's ETag (``If-Match``), so of two waiting runs only
one wins.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

LEASE_NAME = "_lease.json"


def machine_key() -> str:
    """This machine and PID namespace: the boot id and the inode of our PID namespace; "" where unreadable.

    A host name alone is not enough: containers given one fixed host name have separate PID namespaces, where
    ``os.kill(pid, 0)`` says a live holder in another container is gone."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    started_at: str  # UTC, ISO 8601
    expires_at: float  # Unix time; renewed by the heartbeat
    machine: str = ""  # machine_key() of the holder; "" (an older lease, or unreadable): another machine

    def expiry_text(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires_at))

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, started {self.started_at})"

    def gone(self, now: float) -> bool:
        """Whether the holder can no longer be running: its process is gone from this machine, or the lease
        expired."""
        if self.host == socket.gethostname() and self.machine and self.machine == machine_key():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # someone else's live process
                pass
        return now >= self.expires_at


class LeaseBusy(Exception):
    """Another live run holds the output's lease."""

    def __init__(self, holder: Holder):
        super().__init__(holder.describe())
        self.holder = holder


class LeaseLost(Exception):
    """This run's lease was taken over (it missed renewals past its expiry): it must stop writing."""


class LocalStore:
    """The lease as a file in a local (or mounted) folder."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LEASE_NAME)

    def read(self) -> tuple[bytes, str] | None:
        """(content, version), or None when there is no lease. Locally the content is its own version."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data.decode("utf-8", "replace")

    def create(self, data: bytes) -> bool:
        """Write the lease if none exists. A hard link of a complete file is atomic and never replaces a name,
        so a reader never sees a half-written lease and only one creator wins."""
        tmp = f"{self.path}.{os.getpid()}-{threading.get_ident()}.new"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def replace(self, data: bytes, version: str) -> bool:
        """Overwrite the lease if it is still at ``version``; False if it changed or vanished meanwhile."""
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return False
            tmp = f"{self.path}.{os.getpid()}-{threading.get_ident()}.new"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
            return True

    def delete(self, version: str) -> None:
        with self._locked():
            current = self.read()
            if current is not None and current[1] == version:
                os.unlink(self.path)

    def _locked(self):
        """An exclusive flock on a side file for compare-and-replace; the kernel releases it if we die."""
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def held():
            fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the lock

        return held()


class S3Store:
    """The lease as an object, written with S3's conditional PUTs (AWS S3, MinIO, moto honour them)."""

    def __init__(self, bucket: str, key: str, client):
        self.bucket, self.key, self.client = bucket, key, client

    def read(self) -> tuple[bytes, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return obj["Body"].read(), obj["ETag"]

    def create(self, data: bytes) -> bool:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> bool:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> None:
        """Delete the lease only if it is still at ``version`` (DeleteObject with If-Match: AWS since 2024,
        moto too), so a run never deletes a lease another run took over; gone or changed: nothing to do."""
        self._conditional(lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version))

    def _put(self, data: bytes, **condition) -> bool:
        return self._conditional(lambda: self.client.put_object(
            Bucket=self.bucket, Key=self.key, Body=data, ContentType="application/json", **condition))

    def _conditional(self, request) -> bool:
        """True if the conditional request went through, False if its condition failed."""
        from botocore.exceptions import ClientError

        try:
            request()
            return True
        except ClientError as exc:
            # 412: the condition failed (someone else wrote first); 409: a concurrent conditional write won;
            # 404: the lease is gone (released, or taken over and released), so If-Match cannot hold either.
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                               "NoSuchKey") \
                    or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (404, 409, 412):
                return False
            raise


class Lease:
    """This run's hold on an output: ``acquire`` it, then it renews itself until ``release``."""

    def __init__(self, store, run_id: str, expiry_s: float, started_at: str | None = None, clock=time.monotonic):
        self.store, self.run_id, self.expiry_s, self.clock = store, run_id, expiry_s, clock
        self.last_renewed: float | None = None  # clock() when the content of the last successful write was made
        self.started_at = started_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.version: str | None = None
        self.took_over: Holder | None = None  # the dead holder this run replaced, if any
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _content(self) -> bytes:
        holder = Holder(self.run_id, socket.gethostname(), os.getpid(), self.started_at, time.time() + self.expiry_s,
                        machine_key())
        return json.dumps(asdict(holder), indent=2).encode()

    def try_acquire(self) -> Holder | None:
        """Take the lease if it is free or its holder is gone; otherwise return the live holder."""
        while True:
            sent = self.clock()
            data = self._content()
            if self.store.create(data):
                self.version, self.last_renewed = self._version_after(data), sent
                return None
            current = self.store.read()
            if current is None:  # released between our create and read: try again
                continue
            holder = parse(current[0])
            if holder is not None and holder.run_id == self.run_id:
                # Our own write: a create or replace that went through but whose response was lost (a retry
                # then got 412). Its expiry was set no earlier than ``sent``.
                self.version, self.last_renewed = current[1], sent
                return None
            if holder is not None and not holder.gone(time.time()):
                return holder
            if self.store.replace(data, current[1]):
                self.version, self.last_renewed = self._version_after(data), sent
                self.took_over = holder
                return None
            # someone else changed it first (renewed, released, took it over, deleted it): look again

    def acquire(self, wait_s: float | None, poll_s: float, on_wait=None) -> None:
        """Take the lease, waiting up to ``wait_s`` seconds for a live holder (None: don't wait); raise LeaseBusy
        naming the holder if it is still held. ``on_wait(holder)`` is called when waiting starts for a holder.
        Then the heartbeat starts."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        waiting_for = None
        while True:
            holder = self.try_acquire()
            if holder is None:
                break
            if deadline is None or time.monotonic() >= deadline:
                raise LeaseBusy(holder)
            if on_wait is not None and holder.run_id != waiting_for:
                on_wait(holder)
                waiting_for = holder.run_id
            # Wait until the holder's expiry could have passed, or the next poll, whichever is first.
            time.sleep(max(0.05, min(poll_s, deadline - time.monotonic(), holder.expires_at - time.time() + 0.05)))
        self._thread = threading.Thread(target=self._heartbeat, name="docpipe-lease", daemon=True)
        self._thread.start()

    def _version_after(self, data: bytes) -> str:
        current = self.store.read()
        if current is None or current[0] != data:  # not ours after all: treat as lost at once
            raise LeaseLost("the output's lease changed hands while it was being taken")
        return current[1]

    def _heartbeat(self) -> None:
        # Renew well before expiry: a third of it, so two missed beats still leave time.
        while not self._stop.wait(self.expiry_s / 3) and self._beat():
            pass

    def _beat(self) -> bool:
        """One renewal; False once the lease is lost. A failed renewal is logged and the next beat tries again;
        ``check`` gives up once no renewal has gone through for nearly the expiry."""
        try:
            self.renew()
        except LeaseLost as exc:
            self.lost = str(exc)
            return False
        except Exception as exc:
            print(f"docpipe: warning: renewing the output's lease failed ({type(exc).__name__}: {exc}); "
                  "trying again at the next beat", file=sys.stderr, flush=True)
        return True

    def renew(self) -> None:
        with self._lock:
            if self.lost or self.version is None:
                return
            sent = self.clock()
            data = self._content()
            if not self.store.replace(data, self.version):
                current = self.store.read()
                holder = parse(current[0]) if current else None
                raise LeaseLost(f"the output's lease was taken over by {holder.describe()}" if holder
                                else "the output's lease was removed")
            self.version, self.last_renewed = self._version_after(data), sent

    def check(self) -> None:
        """Raise LeaseLost if the heartbeat found the lease taken over, or if no renewal has gone through for
        nearly the expiry (the store kept failing): another run may take the lease over at any moment then. The
        margin (a sixth of the expiry) allows for clock drift between hosts and this run's last write in flight."""
        if not self.lost and self.last_renewed is not None \
                and self.clock() - self.last_renewed > self.expiry_s - self.expiry_s / 6:
            self.lost = f"the output's lease could not be renewed for {self.clock() - self.last_renewed:.0f} s " \
                        f"(its expiry is {self.expiry_s:g} s): another run may take it over"
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.version is not None:  # conditional on our version: a lease taken over is left alone
                self.store.delete(self.version)
            self.version = None


def parse(data: bytes) -> Holder | None:
    """The holder a lease names; None for content that is not a lease (it is then treated as expired)."""
    try:
        fields = json.loads(data)
        return Holder(str(fields["run_id"]), str(fields["host"]), int(fields["pid"]), str(fields["started_at"]),
                      float(fields["expires_at"]), str(fields.get("machine", "")))
    except (ValueError, KeyError, TypeError):
        return None


def store_for(uri: str, storage=None, expiry_s: float | None = None):
    """Where an output's lease lives: a LocalStore, an S3Store, or None for stores without conditional writes
    reachable here (gs://, abfs://), where the run goes on unprotected (the caller says so)."""
    from docpipe.storage import is_remote, resolve, scheme_of, strip_scheme

    if not is_remote(uri):
        _, base = resolve(uri, storage)
        return LocalStore(base)
    if scheme_of(uri) not in ("s3", "s3a"):
        return None
    bucket, _, prefix = strip_scheme(uri).partition("/")
    key = "/".join(p for p in (prefix.strip("/"), LEASE_NAME) if p)
    return S3Store(bucket, key, s3_client(storage, expiry_s))


def s3_client(storage=None, expiry_s: float | None = None):
    """A boto3 S3 client with the settings pyarrow's S3 filesystem gets (docpipe.storage.s3_settings): pyarrow
    cannot send conditional PUTs. For a lease with ``expiry_s``, short timeouts and two attempts, so that one
    request, retries included, takes at most about a seventh of the expiry and a renewal cannot outlast it."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    from docpipe.config import StorageOptions
    from docpipe.storage import s3_settings

    storage = storage or StorageOptions()
    settings = s3_settings(storage)
    endpoint = f"{settings['scheme']}://{settings['endpoint_override']}" if "endpoint_override" in settings else None
    retries = {"max_attempts": storage.max_attempts, "mode": "standard"}
    connect_s, read_s = storage.connect_timeout_s, storage.request_timeout_s
    if expiry_s is not None:
        # 2 attempts in all x (connect + read), each at most expiry/30: at most 4/30 of the expiry per request.
        limit = max(0.5, expiry_s / 30)
        retries = {"total_max_attempts": 2, "mode": "standard"}
        connect_s, read_s = min(connect_s, limit), min(read_s, limit)
    config = Config(retries=retries,
                    connect_timeout=connect_s, read_timeout=read_s,
                    signature_version=UNSIGNED if settings["anonymous"] else None)
    return boto3.client("s3", endpoint_url=endpoint, region_name=settings["region"], config=config,
                        aws_access_key_id=settings.get("access_key"), aws_secret_access_key=settings.get("secret_key"),
                        aws_session_token=settings.get("session_token"))
