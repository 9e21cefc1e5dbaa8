"""One run at a time per output: a lease object under OUT naming the run that holds it.

A run takes the lease before it reads earlier results or touches a file, renews it from a heartbeat thread,
and gives it back once its manifest and lake step are done. Two runs writing one output would remove each
other's unfinished files and process every document twice.

The lease is ``OUT/_lease.json`` (readers skip underscore names): holder run id, host, pid and the pid's start
time, machine key (see ``machine_key``), start time, expiry. Every change is a compare-and-swap: created locally by
hard-linking a complete file to the name (fails if it exists; exclusive create where a mount has no hard links),
on S3 by a conditional PUT (``If-None-Match: *``); renewed, taken over and given back only on the version last
seen (locally under an exclusive ``flock``, released by the kernel if the holder dies; on S3 ``If-Match`` on the
ETag), so of two writers one wins. ``probe`` checks at start that the store honours those conditions.

A lease is judged without trusting another host's clock: its age is the store's own (S3's ``Date`` minus
``Last-Modified``, a file's mtime against a file written now), or how long the taker has seen it unchanged. A
holder is gone once its lease is older than its expiry, or at once when it ran on this machine and its process
has ended (no such pid, a zombie, or the pid reused by another process). The holder stops writing once its last
renewal is five sixths of the expiry old by its monotonic or its wall clock (a paused VM stops the first) and a
renewal now fails. A lost lease is never written or deleted again.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace

LEASE_NAME = "_lease.json"
STAMP_S = 1.0  # S3's Last-Modified and Date count whole seconds: an age read from them may be this much too high
RENEWAL_MARGIN = 5 / 6  # the holder renews every third of the expiry and stops writing past 5/6 without a renewal


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


PF_EXITING = 0x4  # include/linux/sched.h: the task has begun to exit


def _proc_stat(pid: int) -> tuple[bytes, int, int]:
    """(state, flags, start time in clock ticks since boot) of a process, from /proc/PID/stat (fields 3, 9, 22)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()  # the command name in parentheses may hold spaces
    return fields[0], int(fields[6]), int(fields[19])


def _kill_pending(pid: int) -> bool:
    """Whether SIGKILL is pending for a process: sent, not yet acted on (a loaded machine may take a while to
    schedule it). It never runs its own code again."""
    with open(f"/proc/{pid}/status", "rb") as f:
        masks = [int(line.split()[1], 16) for line in f if line.startswith((b"SigPnd:", b"ShdPnd:"))]
    return any(mask & (1 << (signal.SIGKILL - 1)) for mask in masks)


def _own_start() -> int:
    try:
        return _proc_stat(os.getpid())[2]
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    started_at: str  # UTC, ISO 8601
    expires_at: float  # Unix time by the holder's clock (for people); ``Lease.try_acquire`` returns it by ours
    machine: str = ""  # machine_key() of the holder; "" (an older lease, or unreadable): another machine
    expiry_s: float = 0.0  # the holder's expiry; 0: an older lease, judged by the reader's own
    pid_start: int = 0  # the holder process's start, in clock ticks since boot; 0: unknown

    def expiry_text(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires_at))

    def describe(self) -> str:
        if not self.run_id:
            return f"a lease docpipe cannot read ({LEASE_NAME} is half written or not docpipe's)"
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, started {self.started_at})"

    def process_gone(self) -> bool:
        """On this machine (host name and machine key): whether the holder's process has ended: no such pid, a
        zombie (killed but not yet reaped: a parent or a container's init may take seconds, or never reap), one
        exiting or with SIGKILL pending (a whole process group SIGKILLed just now), or the pid now another
        process's (started at another time)."""
        if not (self.host == socket.gethostname() and self.machine and self.machine == machine_key()):
            return False
        try:
            os.kill(self.pid, 0)
            signalled = True
        except ProcessLookupError:
            return True
        except PermissionError:  # someone else's process exists under that pid
            signalled = False
        try:
            state, flags, start = _proc_stat(self.pid)
            if self.pid_start and start != self.pid_start:
                return True
            return state in (b"Z", b"X") or bool(flags & PF_EXITING) or _kill_pending(self.pid)
        except FileNotFoundError:  # ended since os.kill; or, not signalled, hidden (/proc mounted hidepid): alive
            return signalled
        except (OSError, ValueError, IndexError):
            return False

    def gone(self, seen_s: float, default_expiry_s: float) -> bool:
        """Whether the holder can no longer be running: its process has ended on this machine, or its lease has
        not changed for longer than its expiry (``seen_s``: the lease's age by the store's clock, or how long
        the reader has seen it unchanged, whichever is longer)."""
        return self.process_gone() or self.remaining_s(seen_s, default_expiry_s) <= 0

    def remaining_s(self, seen_s: float, default_expiry_s: float) -> float:
        """Seconds until a lease seen unchanged for ``seen_s`` expires (the stores' stamps' second added)."""
        return (self.expiry_s or default_expiry_s) + STAMP_S - seen_s


UNREADABLE = Holder("", "", 0, "", 0.0)  # a lease file docpipe cannot parse: kept until unchanged for the expiry


class LeaseBusy(Exception):
    """Another live run holds the output's lease."""

    def __init__(self, holder: Holder):
        super().__init__(holder.describe())
        self.holder = holder


class LeaseLost(Exception):
    """This run's lease was taken over (it missed renewals past its expiry): it must stop writing."""


class LeaseUnsupported(Exception):
    """The output's store lacks a primitive the lease needs (conditional writes, locks)."""


@dataclass(frozen=True)
class Seen:
    """The lease as read from its store."""

    data: bytes
    version: str
    age_s: float | None  # seconds since it was written, by the store's own clock; None: the store gave none


class LocalStore:
    """The lease as a file in a local (or mounted) folder."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LEASE_NAME)
        self.links = True  # False where the mount has no hard links (``probe``): exclusive create instead

    def _tmp(self, what: str) -> str:
        return f"{self.path}.{os.getpid()}-{threading.get_ident()}.{what}"

    def probe(self) -> None:
        """Hard links (SMB and FUSE mounts may refuse them: then the lease is created with O_EXCL, which those
        servers decide atomically, and a half-written lease is waited on like a live one) and flock."""
        tmp, name = self._tmp("probe"), f"{self.path}.probe-{secrets.token_hex(4)}"
        with open(tmp, "wb"):
            pass
        try:
            os.link(tmp, name)
            os.unlink(name)
        except OSError:
            self.links = False
        finally:
            os.unlink(tmp)
        try:
            with self._locked():
                pass
        except OSError as exc:
            raise LeaseUnsupported(f"cannot lock files in {self.folder} (flock: {exc}), which its lease needs; "
                                   "write the output to a local disk, NFS or S3") from None

    def read(self) -> Seen | None:
        """The lease, or None when there is none. Locally the content is its own version."""
        try:
            with open(self.path, "rb") as f:
                data, mtime = f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Seen(data, data.decode("utf-8", "replace"), self._now() - mtime)

    def _now(self) -> float:
        """The store's clock: the modification time it gives a file written now (on a network mount, the
        server's, the clock that stamped the lease)."""
        path = self._tmp("now")
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.unlink(path)

    def create(self, data: bytes) -> str | None:
        """Write the lease if none exists; its version, or None if one exists. A hard link of a complete file is
        atomic and never replaces a name, so a reader never sees a half-written lease and only one creator wins."""
        if not self.links:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return data.decode("utf-8", "replace")
        tmp = self._tmp("new")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self.path)
            return data.decode("utf-8", "replace")
        except FileExistsError:
            return None
        except OSError:  # no hard links on this mount (EPERM, ENOTSUP, ENOSYS...): exclusive create from now on
            self.links = False
        finally:
            os.unlink(tmp)
        return self.create(data)

    def replace(self, data: bytes, version: str) -> str | None:
        """Overwrite the lease if it is still at ``version``: the new version, or None if it changed or vanished."""
        with self._locked():
            current = self._content()
            if current is None or current != version:
                return None
            tmp = self._tmp("new")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
            return data.decode("utf-8", "replace")

    def delete(self, version: str) -> None:
        with self._locked():
            if self._content() == version:
                os.unlink(self.path)

    def _content(self) -> str | None:
        try:
            with open(self.path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return None

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
    """The lease as an object, written with S3's conditional PUTs (AWS S3, MinIO and moto honour them;
    ``probe`` checks)."""

    def __init__(self, bucket: str, key: str, client):
        self.bucket, self.key, self.client = bucket, key, client

    def probe(self) -> None:
        """Check on a scratch object that PutObject honours If-None-Match and If-Match, as the lease needs; raise
        LeaseUnsupported naming what the store ignored. (DeleteObject's If-Match is not needed: MinIO ignores it,
        minio/minio#21677, so the lease is given back only right after a renewal proved it ours.)"""
        key = f"{self.key}.probe-{secrets.token_hex(4)}"
        try:
            self._probe(key)
        except BaseException:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except Exception:  # the probe's own error says more
                pass
            raise
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def _probe(self, key: str) -> None:
        ghost = '"00000000000000000000000000000000"'
        where = f"the store at {self.client.meta.endpoint_url} (bucket {self.bucket})"
        if self._put(b"1", key, IfMatch=ghost) is not None or self._body(key) is not None:
            raise LeaseUnsupported(f"{where} wrote an object for a PUT with If-Match although none existed "
                                   "(MinIO before its fix of minio/minio#21526 does): its lease cannot keep two runs "
                                   "apart; upgrade the store or write the output elsewhere")
        if self._put(b"2", key, IfNoneMatch="*") is None and self._body(key) != b"2":  # a retry may meet it: 412
            raise LeaseUnsupported(f"{where} refused to create an object with If-None-Match: *")
        for what, condition in (("If-None-Match: *", {"IfNoneMatch": "*"}), ("If-Match", {"IfMatch": ghost})):
            if self._put(b"3", key, **condition) is not None:
                raise LeaseUnsupported(f"{where} ignores {what} on PutObject (it replaced an existing object): its "
                                       "lease cannot keep two runs apart; use a store that honours conditional "
                                       "writes (AWS S3, MinIO) or write the output elsewhere")

    def _body(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def read(self) -> Seen | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return Seen(obj["Body"].read(), obj["ETag"], _age(obj))

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> None:
        """Delete the lease if it is still at ``version``, where DeleteObject honours If-Match (AWS since 2024,
        moto); MinIO deletes it whatever its version, hence the renewal just before (``Lease.release``)."""
        self._conditional(lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version))

    def _put(self, data: bytes, key: str | None = None, **condition) -> str | None:
        """The new ETag, or None if the condition failed."""
        answer = self._conditional(lambda: self.client.put_object(
            Bucket=self.bucket, Key=key or self.key, Body=data, ContentType="application/json", **condition))
        return None if answer is None else answer["ETag"]

    def _conditional(self, request) -> dict | None:
        """The response of a conditional request, or None if its condition failed."""
        from botocore.exceptions import ClientError

        try:
            return request()
        except ClientError as exc:
            # 412: the condition failed (someone else wrote first); 409: a concurrent conditional write won;
            # 404: the lease is gone (released, or taken over and released), so If-Match cannot hold either.
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                               "NoSuchKey") \
                    or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (404, 409, 412):
                return None
            raise


def _age(obj: dict) -> float | None:
    """An object's age by the store's clock: the response's Date minus the object's Last-Modified."""
    from email.utils import parsedate_to_datetime

    try:
        return (parsedate_to_datetime(obj["ResponseMetadata"]["HTTPHeaders"]["date"])
                - obj["LastModified"]).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


class Lease:
    """This run's hold on an output: ``acquire`` it, then it renews itself until ``release``. ``clock`` and
    ``wall`` (monotonic and Unix time) are injectable for tests."""

    def __init__(self, store, run_id: str, expiry_s: float, started_at: str | None = None, clock=time.monotonic,
                 wall=time.time):
        self.store, self.run_id, self.expiry_s, self.clock, self.wall = store, run_id, expiry_s, clock, wall
        # clock() and wall() when the last write known to be this run's was sent (it landed no earlier)
        self.last_renewed: float | None = None
        self.last_renewed_wall: float | None = None
        self.started_at = started_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.version: str | None = None
        self.took_over: Holder | None = None  # the dead holder this run replaced, if any
        self.lost: str | None = None
        self._watch: tuple[str, float] | None = None  # (version, clock()) a taker first saw it at
        self._pid_start = _own_start()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _content(self) -> bytes:
        holder = Holder(self.run_id, socket.gethostname(), os.getpid(), self.started_at,
                        self.wall() + self.expiry_s, machine_key(), self.expiry_s, self._pid_start)
        return json.dumps(asdict(holder), indent=2).encode()

    def _confirm(self, version: str, sent: tuple[float, float]) -> None:
        self.version = version
        self.last_renewed, self.last_renewed_wall = sent

    def _unchanged_for(self, version: str) -> float:
        """How long this reader has seen the lease at ``version``: a lower bound on its age, by our own clock."""
        now = self.clock()
        if self._watch is None or self._watch[0] != version:
            self._watch = (version, now)
        return now - self._watch[1]

    def try_acquire(self) -> Holder | None:
        """Take the lease if it is free or its holder is gone; otherwise return the live holder, its
        ``expires_at`` by our clock."""
        sent = (self.clock(), self.wall())
        while True:
            data = self._content()
            version = self.store.create(data)
            if version is not None:
                self._confirm(version, sent)
                return None
            current = self.store.read()
            if current is None:  # released between our create and read: try again
                continue
            holder = parse(current.data)
            if holder is not None and holder.run_id == self.run_id:
                # Our own write: a create or replace that went through but whose response was lost (a retry
                # then got 412). It was sent no earlier than ``sent``.
                self._confirm(current.version, sent)
                return None
            holder = holder or UNREADABLE
            seen_s = max(current.age_s or 0.0, self._unchanged_for(current.version))
            if not holder.gone(seen_s, self.expiry_s):
                return replace(holder, expires_at=self.wall() + holder.remaining_s(seen_s, self.expiry_s))
            version = self.store.replace(data, current.version)
            if version is not None:
                self._confirm(version, sent)
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
            time.sleep(max(0.05, min(poll_s, deadline - time.monotonic(), holder.expires_at - self.wall() + 0.05)))
        self._thread = threading.Thread(target=self._heartbeat, name="docpipe-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        # Renew well before expiry: a third of it, so two missed beats still leave time.
        while not self._stop.wait(self.expiry_s / 3) and self._beat():
            pass

    def _beat(self) -> bool:
        """One renewal; False once the lease is lost (said at once on stderr). A failed renewal is logged and the
        next beat tries again; ``check`` stops the run once no renewal has gone through for 5/6 of the expiry."""
        try:
            self.renew()
        except LeaseLost as exc:
            print(f"docpipe: warning: {exc}; this run stops before its next write", file=sys.stderr, flush=True)
            return False
        except Exception as exc:
            print(f"docpipe: warning: renewing the output's lease failed ({type(exc).__name__}: {exc}); "
                  "trying again at the next beat", file=sys.stderr, flush=True)
        return True

    def renew(self) -> None:
        """Write a later expiry on our version; raise LeaseLost (and remember it) if another run holds the lease
        now, or it is gone."""
        with self._lock:
            self._renew()

    def _renew(self) -> None:
        if self.lost:
            raise LeaseLost(self.lost)
        if self.version is None:
            return
        for _ in range(3):
            sent = (self.clock(), self.wall())
            data = self._content()
            version = self.store.replace(data, self.version)
            if version is not None:
                self._confirm(version, sent)
                return
            current = self.store.read()
            holder = parse(current.data) if current else None
            if holder is None or holder.run_id != self.run_id:
                self.lost = ("the output's lease was removed" if current is None
                             else f"the output's lease was taken over by {(holder or UNREADABLE).describe()}")
                raise LeaseLost(self.lost)
            # Our own record at another version: a write of ours that went through while its response was lost
            # (a retry then got 412, or the request raised). Adopt it; if it is this very write, it is the renewal.
            self.version = current.version
            if current.data == data:
                self._confirm(current.version, sent)
                return
        raise RuntimeError("the output's lease changed version under three renewals in a row")

    def _since_renewed(self) -> float:
        """Time since the last renewal was sent, by the monotonic clock or the wall clock, whichever says more:
        the monotonic clock stops while a VM is paused or suspended, and the lease ages on meanwhile."""
        return max(self.clock() - self.last_renewed, self.wall() - self.last_renewed_wall)

    def check(self) -> None:
        """Raise LeaseLost if this run may no longer write: the heartbeat found the lease taken over, or no
        renewal has gone through for 5/6 of the expiry (a stalled or paused process, a store that keeps failing)
        and renewing now fails. A renewal that goes through is a conditional write on our version: proof that
        no run took the lease over meanwhile."""
        if not self.lost and self.last_renewed is not None:
            late = self._since_renewed()
            if late > self.expiry_s * RENEWAL_MARGIN:
                try:
                    self.renew()
                except LeaseLost:
                    pass
                except Exception as exc:
                    self.lost = (f"the output's lease could not be renewed for {late:.0f} s (its expiry is "
                                 f"{self.expiry_s:g} s; {type(exc).__name__}: {exc}): another run may take it over")
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and give the lease back: renew it (proof that it is still ours, and a fresh expiry
        for the moment the delete takes), then delete that version. A lost lease is never touched again: it is
        another run's, or about to be. Raises LeaseLost if the lease turns out to have been taken over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            try:
                if self.version is None or self.lost:
                    return
                self._renew()
                self.store.delete(self.version)
            finally:
                self.version = None


def parse(data: bytes) -> Holder | None:
    """The holder a lease names; None for content that is not a lease (half written, or not docpipe's)."""
    try:
        fields = json.loads(data)
        return Holder(str(fields["run_id"]), str(fields["host"]), int(fields["pid"]), str(fields["started_at"]),
                      float(fields["expires_at"]), str(fields.get("machine", "")),
                      float(fields.get("expiry_s", 0.0)), int(fields.get("pid_start", 0)))
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
