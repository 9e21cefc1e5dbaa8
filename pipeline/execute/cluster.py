"""Ray's cluster: starting a local instance or joining the one named by RAY_ADDRESS (``init_ray``), token
authentication, and one clear line when joining fails.

Shared by `docpipe run` (execute/plan.py and execute/train.py start or join with ``init_ray``), `docpipe submit`
(execute/submit.py talks to the cluster's job server) and `docpipe bench` (``shutdown_ray``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile
import threading
import time

from docpipe.errors import ClusterError

PROBE_TIMEOUT_S = 5.0
# Ray tries to reach the GCS once a second, 20 times by default, and logs each failure; a refused token or a
# version mismatch won't change between tries.
JOIN_ATTEMPTS = 3


def use_token_auth() -> bool:
    """Turn Ray's token mode on when the user gave a token; True if one was given.

    Ray's client sends the token only in token mode, and an explicit address never turns that mode on by
    itself. Call before Ray is imported: Ray reads its mode once. RAY_AUTH_MODE, when set, is left alone.
    """
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.path.isfile(os.path.expanduser(path)):
        raise ClusterError(f"RAY_AUTH_TOKEN_PATH names no file: {path}")
    given = bool(os.environ.get("RAY_AUTH_TOKEN") or path)
    if given and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
    return given


def gcs_host_port(address: str) -> tuple[str, int] | None:
    """Host and port of a cluster address (HOST:PORT or ray://HOST:PORT); None for `auto` and the like."""
    if address.startswith(("http://", "https://")):
        raise ClusterError(f"RAY_ADDRESS={address} is a dashboard (job server) address: docpipe run joins the "
                           "cluster's GCS address, HOST:6379 by default (or use docpipe submit --address "
                           f"{address})")
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d+)", address.strip())
    return (match.group(1), int(match.group(2))) if match else None


def is_loopback(address: str) -> bool:
    target = gcs_host_port(address)
    return target is not None and (target[0] == "localhost" or target[0] == "::1" or target[0].startswith("127."))


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, in one line, when nothing answers at the address (Ray would retry for a long while)."""
    target = gcs_host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except socket.timeout:
        raise ClusterError(f"no Ray cluster answers at {address} (no reply within {timeout_s:g} s): check "
                           "RAY_ADDRESS (HOST:PORT of the head's GCS, 6379 by default) and that the host is reachable"
                           ) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(f"no Ray cluster answers at {address} ({reason}): start one with `ray start --head`, "
                           "or set RAY_ADDRESS to the head's GCS address (HOST:6379 by default)") from None


def join_error(address: str, failure: BaseException, log: str, token_given: bool) -> ClusterError:
    """One line for a failed join, from Ray's exception chain and its log output."""
    chain, seen, exc = [], set(), failure
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    text = "\n".join(chain) + "\n" + log
    if "InvalidAuthToken" in text or "Unauthenticated" in text or "AuthenticationError" in text:
        if token_given:
            return ClusterError(f"the Ray cluster at {address} refused the token: set RAY_AUTH_TOKEN (or "
                                "RAY_AUTH_TOKEN_PATH) to the cluster's token (`ray get-auth-token` on the head)")
        return ClusterError(f"the Ray cluster at {address} requires a token: export RAY_AUTH_TOKEN=<the "
                            "cluster's token> (`ray get-auth-token` on the head), or RAY_AUTH_TOKEN_PATH=<its file>")
    versions = re.search(r"Version mismatch.*?Ray: (\S+)\s+Python: (\S+).*?Ray: (\S+)\s+Python: (\S+)", text, re.S)
    if versions:
        cluster_ray, cluster_py, here_ray, here_py = versions.groups()
        return ClusterError(f"version mismatch with the Ray cluster at {address}: it runs Ray {cluster_ray} on "
                            f"Python {cluster_py}, this machine Ray {here_ray} on Python {here_py}: install the "
                            "cluster's versions here")
    if "No node info found" in text:  # Ray looked for a node of the cluster on this machine for a minute
        return ClusterError(f"no node of the Ray cluster at {address} runs on this machine: docpipe run joins as a "
                            "driver from one of the cluster's machines; from elsewhere, use docpipe submit")
    # Otherwise: the last thing Ray's client logged (" W "/" E " lines name the cause), else Ray's own message.
    logged = re.findall(r"^\[[^\]]*\s[WEF]\s[^\]]*\]\s*\S+:\d+:\s*(.+)$", log, re.M)
    cause = logged[-1] if logged else chain[0]
    return ClusterError(f"cannot join the Ray cluster at {address}: {' '.join(cause.split())[:300]}")


@contextlib.contextmanager
def joining(address: str, token_given: bool):
    """Around Ray's join: a bounded number of tries, and Ray's log lines kept off the terminal unless it works.

    A failure becomes a ClusterError. On success, whatever Ray printed is passed on. DOCPIPE_DEBUG=1 shows
    everything as it comes.
    """
    probe(address)
    debug = bool(os.environ.get("DOCPIPE_DEBUG"))
    saved = os.environ.get("RAY_gcs_server_port_wait_time_s")
    if saved is None:  # a budget the user set stands
        os.environ["RAY_gcs_server_port_wait_time_s"] = str(JOIN_ATTEMPTS)
    # Ray's C++ client logs each failed try straight to file descriptor 2, so that is what is captured.
    log = tempfile.TemporaryFile(mode="w+b")
    sys.stdout.flush()
    sys.stderr.flush()
    stderr_fd = os.dup(2)
    if not debug:
        os.dup2(log.fileno(), 2)
    failure = None
    try:
        yield
    except Exception as exc:
        failure = exc
    finally:
        sys.stderr.flush()
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        if saved is None:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)
        log.seek(0)
        captured = log.read().decode("utf-8", "replace")
        log.close()
    if failure is not None:
        raise join_error(address, failure, captured, token_given) from None
    if captured:
        sys.stderr.write(captured)
        sys.stderr.flush()


class _SplitStderr:
    """sys.stderr during a quiet Ray run: what Python's logging handlers (Ray's, which Ray re-creates on init and on
    each dataset, bound to whatever sys.stderr is then) and its warnings module write goes to the log; the rest
    (docpipe's own lines) to the real stderr."""

    def __init__(self, real, log):
        self.real, self.log = real, log

    def write(self, text: str) -> int:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        target = self.log if caller in ("logging", "warnings") or caller.startswith("ray") else self.real
        return target.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.real.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the real stderr's
        return getattr(self.real, name)


@contextlib.contextmanager
def ray_logs_to_file(enabled: bool):
    """While docpipe prints its own progress: Ray's log lines go to a file instead of stderr (the caller says where,
    once Ray has started: a join that fails stays one line). What Ray's C++ core writes to file descriptor 2 (actor
    warnings, say) and what its Python loggers write land in that file, while docpipe's own lines and errors keep
    the real stderr. Workers' output stays in Ray's session logs (init_ray's log_to_driver). Yields the path, or
    None when not enabled."""
    if not enabled:
        yield None
        return
    folder = os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "docpipe-logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"ray-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log")
    log = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    sys.stdout.flush()
    sys.stderr.flush()
    real_fd, saved = os.dup(2), sys.stderr
    try:
        on_fd2 = saved.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a notebook's stream, pytest's capture: it stays as it is
        on_fd2 = False
    os.dup2(log.fileno(), 2)  # C++ lines, and handlers made before now that hold the old sys.stderr
    real = os.fdopen(os.dup(real_fd), "w", buffering=1, encoding=getattr(saved, "encoding", None) or "utf-8",
                     errors="backslashreplace") if on_fd2 else saved
    sys.stderr = _SplitStderr(real, log)
    try:
        yield path
    finally:
        sys.stderr.flush()
        sys.stderr = saved
        os.dup2(real_fd, 2)
        os.close(real_fd)
        if real is not saved:
            real.close()
        log.close()


def _before_import() -> tuple[str | None, bool]:
    """What must be set before Ray is first imported; (the address to join or None, whether a token was given)."""
    address = os.environ.get("RAY_ADDRESS") or None
    token_given = False
    if address is None or is_loopback(address):
        # A local instance needs no other host: without this, Ray listens on every interface and advertises
        # the machine's network address. A head joined on loopback is on this machine: without this, Ray
        # swaps 127.0.0.1 for the network address, where a head bound to loopback never answers. Read when
        # Ray is first imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address is not None:
        token_given = use_token_auth()  # before Ray is imported, which reads the mode once
    return address, token_given


def init_ray(quiet: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray instance bound to loopback. ``quiet``: docpipe
    prints its own progress, so the workers' output stays in Ray's session logs instead of reaching stderr (see
    ray_logs_to_file for the driver's). Ray's init sets a SIGTERM handler of its own: the caller's is put back."""
    address, token_given = _before_import()
    import ray

    if ray.is_initialized():
        return
    import signal

    sigterm = signal.getsignal(signal.SIGTERM)  # execute/run.py's: SIGTERM seals the run's finished work
    options = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": not quiet}
    if address is None:
        # "local": a new instance, even if `ray start` left a cluster on this machine (ray.init() would join it)
        ray.init(address="local", **options)
    else:
        with joining(address, token_given):
            ray.init(address=address, **options)
    if threading.current_thread() is threading.main_thread() and sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)


def shutdown_ray() -> None:
    """Leave Ray (stopping a local instance): frees the cores and GPU its actors held, for work that follows."""
    import ray

    ray.shutdown()
