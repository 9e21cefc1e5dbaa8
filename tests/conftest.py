import os
import subprocess
import sys

# Before anything imports transformers or starts Ray (whose workers inherit the environment).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.pop("RAY_ADDRESS", None)
# Local Ray on loopback only (see docpipe.execute.cluster.init_ray); read when Ray is first imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# No fixed port from the environment: a GCS port set here would make every local Ray instance of every test worker
# ask for the same one. Unset, Ray lets the OS give each instance its own.
os.environ.pop("RAY_GCS_SERVER_PORT", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # The two tiers: tests marked ray start Ray (a local instance, a cluster or `ray start`) and prove the wiring
    # through it; the rest run in-process or on the local executor. `pytest -m "not ray"` runs the fast tier alone.
    config.addinivalue_line("markers", "ray: starts Ray (the Ray tier: wiring proved once each through Ray)")
    # pytest-xdist would otherwise queue files by their number of tests (--loadscope-reorder, its default), which
    # puts the few long Ray tests last: keep the collection order, longest first (pytest_collection_modifyitems)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


# The longest files first (CI's profile, --durations): `--dist loadfile` hands each file whole to the next free
# worker in collection order (with xdist's reordering off, above), so a long file collected last would run alone at
# the end while the other worker idles.
LONGEST_FIRST = ["test_engines.py", "test_nothing_lost.py", "test_node_loss.py", "test_submit.py",
                 "test_fidelity.py", "test_bench.py", "test_extract.py", "test_finetune.py", "test_s3.py",
                 "test_run.py", "test_lease.py", "test_report.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def local_job(tmp_path_factory):
    """A config file choosing the local executor, for `docpipe run --config` beside other flags: the stages run in
    the CLI's own process, no Ray instance is started (for tests whose subject Ray adds nothing to)."""
    path = tmp_path_factory.mktemp("local-job") / "local.yaml"
    path.write_text("executor: local\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def docpipe_cache(tmp_path_factory):
    """One tiny checkpoint per test session, shared by the driver, Ray workers and CLI subprocesses."""
    cache = os.environ.get("DOCPIPE_TEST_CACHE") or str(tmp_path_factory.mktemp("docpipe-cache"))
    os.environ["DOCPIPE_CACHE"] = cache
    return Path(cache)


@pytest.fixture(scope="session")
def tiny_checkpoint(docpipe_cache):
    from docpipe.model.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from docpipe.config import ModelOptions
    from docpipe.model.load import load_model

    return load_model(ModelOptions(name="tiny-random", max_new_tokens=6), str(tiny_checkpoint))


@pytest.fixture(scope="session")
def sample_docs(tmp_path_factory):
    """The demo documents (multi-page PDFs, JPEG scan, receipt PNG, 2-page TIFF) plus one corrupt 'PDF'."""
    from docpipe.tools.demo import make_samples

    folder = tmp_path_factory.mktemp("docs")
    make_samples(folder)
    from tests.bad_inputs import noise

    (folder / "corrupt.pdf").write_bytes(noise(4096))  # never starts with a real signature
    return folder


def start_cli(*args, env=None, unset=(), fresh=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
              new_session=False):
    """The docpipe CLI started in a process of its own, as ``subprocess.Popen(..., text=True)`` would start it
    (``stdout``/``stderr``: subprocess.PIPE, the default, DEVNULL or None; ``new_session``: start_new_session); the
    object returned has Popen's ways (pid, poll, wait, kill, send_signal, communicate, and the pipes).

    The process is forked from the CLI server (tests/cli_server.py), which has done the imports once. A command
    needs a fresh interpreter where its subject is the process itself (``fresh``: its command line as Ray records
    it) or its imports (another PYTHONPATH: modules blocked, another transformers); every command gets one when
    DOCPIPE_TEST_FRESH_CLI=1. ``unset`` names variables of this process the command must not inherit."""
    env = {**{k: v for k, v in os.environ.items() if k not in unset}, "PYTHONPATH": str(REPO), **(env or {})}
    argv = [str(a) for a in args]
    if fresh or env["PYTHONPATH"] != str(REPO) or os.environ.get("DOCPIPE_TEST_FRESH_CLI"):
        return subprocess.Popen([sys.executable, "-m", "docpipe.cli", *argv], cwd=REPO, env=env, text=True,
                                stdout=stdout, stderr=stderr, start_new_session=new_session)
    return _cli_server().start(argv, env, stdout, stderr, new_session)


def run_cli(*args, env=None, unset=(), timeout=600, fresh=False):
    """The docpipe CLI run to its end, as ``subprocess.run(..., capture_output=True, text=True)`` would (see
    start_cli)."""
    proc = start_cli(*args, env=env, unset=unset, fresh=fresh)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


class _ServedCli:
    """A command the CLI server forked, seen as a subprocess.Popen: its replies come through _CliServer."""

    def __init__(self, args, stdout, stderr):
        import threading

        self.args, self.stdout, self.stderr = args, stdout, stderr
        self.returncode = None
        self._pid = None
        self.started, self.ended = threading.Event(), threading.Event()

    @property
    def pid(self) -> int:
        if not self.started.wait(300) or self._pid is None:
            raise RuntimeError(f"the CLI server never started {self.args}")
        return self._pid

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        if not self.ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        if self.returncode is None:
            raise RuntimeError(f"the CLI server died running {self.args}")
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self):
        import signal

        self.send_signal(signal.SIGKILL)

    def terminate(self):
        import signal

        self.send_signal(signal.SIGTERM)

    def communicate(self, timeout=None):
        """Both pipes read to their end, as Popen.communicate reads them, then the exit status."""
        import threading
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        read = {}
        readers = [threading.Thread(target=lambda n=name, f=pipe: read.__setitem__(n, f.read()), daemon=True)
                   for name, pipe in (("stdout", self.stdout), ("stderr", self.stderr)) if pipe is not None]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        for pipe in (self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return read.get("stdout"), read.get("stderr")


class _CliServer:
    """The client of tests/cli_server.py: one server per test worker, any number of commands at a time (from
    threads). Requests go on a Unix socket with the command's stdin, stdout and stderr; replies come on the
    server's stdout."""

    def __init__(self):
        import socket
        import threading

        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.cli_server", str(theirs.fileno())], cwd=REPO,
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        theirs.close()
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.commands: dict[int, _ServedCli] = {}
        self.next_id = 0
        threading.Thread(target=self._read, name="cli-server-replies", daemon=True).start()

    def _read(self):
        import json

        for line in self.proc.stdout:
            message = json.loads(line)
            if message.get("ready"):
                self.ready.set()
                continue
            with self.lock:
                command = self.commands[message["id"]]
            if "pid" in message:
                command._pid = message["pid"]
                command.started.set()
            else:
                with self.lock:
                    del self.commands[message["id"]]
                command.returncode = message["rc"]
                command.ended.set()
        self.ready.set()  # the server is gone: whoever waits finds out
        with self.lock:
            for command in self.commands.values():
                command.started.set()
                command.ended.set()

    def start(self, argv, env, stdout, stderr, new_session) -> _ServedCli:
        import json
        import socket

        if not self.ready.wait(300) or self.proc.poll() is not None:
            raise RuntimeError(f"the CLI server did not start (exit code {self.proc.poll()})")
        theirs, ours = [os.open(os.devnull, os.O_RDONLY)], {}
        for name, how in (("stdout", stdout), ("stderr", stderr)):
            if how == subprocess.PIPE:
                r, w = os.pipe()
                ours[name] = open(r, encoding="utf-8")  # universal newlines, as Popen's text mode reads
                theirs.append(w)
            elif how == subprocess.DEVNULL:
                theirs.append(os.open(os.devnull, os.O_WRONLY))
            elif how is None:  # inherited
                theirs.append(os.dup(1 if name == "stdout" else 2))
            else:
                raise ValueError(f"{name}={how!r}: PIPE, DEVNULL or None")
        command = _ServedCli([sys.executable, "-m", "docpipe.cli", *argv], ours.get("stdout"), ours.get("stderr"))
        try:
            with self.lock:
                self.next_id += 1
                self.commands[self.next_id] = command
                request = {"id": self.next_id, "argv": argv, "env": env, "cwd": str(REPO),
                           "new_session": new_session}
                socket.send_fds(self.sock, [json.dumps(request).encode()], theirs)
        finally:
            for fd in theirs:  # the child holds them now (in flight, the socket does)
                os.close(fd)
        return command

    def close(self):
        self.sock.close()  # the server finishes what runs, then exits
        try:
            self.proc.wait(60)
        except Exception:
            self.proc.kill()


_SERVER = []


def _cli_server() -> _CliServer:
    if not _SERVER:
        _SERVER.append(_CliServer())
    return _SERVER[0]


@pytest.fixture(scope="session", autouse=True)
def cli_server(docpipe_cache):
    """The CLI server, started by the first command that needs it (a session without one starts none), closed at
    the session's end."""
    yield
    if _SERVER:
        _SERVER.pop().close()


S3_SECRET = "s3cr3t-Do-Not-Print-7f3a9"  # a distinctive secret: tests check it never leaks


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(extra_env=None):
    """moto's S3 in server mode, as a separate process serving real HTTP on loopback, on the port the OS gives it
    when it binds (-p 0): its address is the line the server writes once it listens (no port picked beforehand that
    another test worker could take meanwhile)."""
    import re
    import tempfile
    import time
    import urllib.request

    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)  # its request log goes on too
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, **(extra_env or {})},
    )
    deadline = time.monotonic() + 120  # a safety net: a loaded 2-core machine can take a while to import moto
    url = None
    while True:
        if url is None:
            found = re.search(r"Running on (http://127\.0\.0\.1:\d+)", Path(log.name).read_text(errors="replace"))
            url = found and found.group(1)
        try:
            if url is not None:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
        except Exception:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("moto server did not start:\n" + Path(log.name).read_text(errors="replace")[-2000:])
        time.sleep(0.1)
    return proc, url


@pytest.fixture(scope="session")
def s3_server():
    proc, url = _start_moto()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_env(s3_server):
    """The standard AWS variables pointing at the test server, for CLI subprocesses."""
    return {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "AKIATESTING",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture(scope="session")
def s3(s3_env):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_env["AWS_ENDPOINT_URL"],
        aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


@pytest.fixture(scope="session")
def s3_auth_server():
    """A second server that checks credentials: no access key exists there, so every request is refused."""
    proc, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield url
    proc.terminate()
    proc.wait(timeout=10)
