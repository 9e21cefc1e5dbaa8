import os
import sys

# Before anything imports transformers or starts Ray (whose workers inherit the environment).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.pop("RAY_ADDRESS", None)
# Local Ray on loopback only (see pipeline.execute.cluster.init_ray); read when Ray is first imported.
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
LONGEST_FIRST = ["test_nothing_lost.py", "test_node_loss.py", "test_bench.py", "test_engines.py",
                 "test_submit.py", "test_s3.py", "test_extract.py", "test_run.py", "test_finetune.py",
                 "test_fidelity.py", "test_lease.py"]


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
    from pipeline.model.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from pipeline.config import ModelOptions
    from pipeline.model.load import load_model

    return load_model(ModelOptions(name="tiny-random", max_new_tokens=6), str(tiny_checkpoint))


@pytest.fixture(scope="session")
def sample_docs(tmp_path_factory):
    """The demo documents (multi-page PDFs, JPEG scan, receipt PNG, 2-page TIFF) plus one corrupt 'PDF'."""
    from pipeline.tools.demo import make_samples

    folder = tmp_path_factory.mktemp("docs")
    make_samples(folder)
    from tests.bad_inputs import noise

    (folder / "corrupt.pdf").write_bytes(noise(4096))  # never starts with a real signature
    return folder


def run_cli(*args, env=None, unset=(), timeout=600):
    """The docpipe CLI in a subprocess; ``unset`` names variables of this process it must not inherit."""
    import subprocess

    full = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**full, "PYTHONPATH": str(REPO), **(env or {})},
    )


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
    import subprocess
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
