"""docpipe on an existing cluster: a real Ray head started on loopback by the test, with token authentication.

`docpipe submit` sends runs to its job server; `docpipe run` joins it as a driver (RAY_ADDRESS). Both share
one head, as heads are expensive.
"""

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from docpipe.config import RunConfig
from docpipe.errors import ConfigError
from docpipe.schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA, DocumentRow, PageRow
from tests.conftest import REPO, _free_port, run_cli


TOKEN = secrets.token_hex(32)
AUTH = {"RAY_AUTH_TOKEN": TOKEN}  # what a user exports; docpipe submit turns token mode on for it


def _get(url: str) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})


_DASHBOARD_ADDRESS = """
import sys
from ray._private import ray_constants
from ray._raylet import GcsClient

url = GcsClient(address=sys.argv[1]).internal_kv_get(ray_constants.DASHBOARD_ADDRESS.encode(),
                                                    namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
print(url.decode() if url else "")
"""


def _dashboard_address(gcs: str, env: dict) -> str | None:
    """The job server's address as the dashboard recorded it in the GCS once it bound its port (None until then)."""
    proc = subprocess.run([sys.executable, "-c", _DASHBOARD_ADDRESS, gcs], capture_output=True, text=True, env=env,
                          timeout=120)
    url = proc.stdout.strip() if proc.returncode == 0 else ""
    return f"http://{url}" if url else None


@pytest.fixture(scope="module")
def head(docpipe_cache):
    """`ray start --head` with its dashboard (the job server) on 127.0.0.1, as its own process group, with
    token authentication on (Ray's default for clusters): clients need RAY_AUTH_TOKEN. Yields its job server
    address (for docpipe submit) and its GCS address (RAY_ADDRESS, for docpipe run)."""
    # Every port the OS's, given when Ray binds (0), never a number chosen before: the GCS (its address is the file
    # `ray start` writes in its temp dir), the dashboard (the job server; its address is in the GCS), and the
    # dashboard agent the job server hands jobs to (its default, 52365, is taken by any other Ray instance on the
    # machine, such as a run in another test worker, and then every job is refused: "No available agent to submit
    # job"). The Ray client server takes no 0: a port the OS gave just now, not its default 10001.
    # Ray's session and sockets: a short path of its own, since a socket's path must fit in 107 bytes (under
    # pytest-xdist the test's own temporary folder is already 48 characters deep)
    temp = tempfile.mkdtemp(prefix="dp-head-", dir="/tmp")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # no 30 s drain at teardown: nothing serves here
    env.pop("RAY_ADDRESS", None)
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # as in an activated environment: jobs run `python`
    ray = os.path.join(bin_dir, "ray")
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", "0",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", "0", "--num-cpus", "2",
         "--dashboard-agent-listen-port", "0", "--ray-client-server-port", str(_free_port()),
         "--temp-dir", str(temp), "--disable-usage-stats"],
        env=env, stdout=(log := open(os.path.join(temp, "start.log"), "wb")), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    gcs_file = Path(temp) / "ray_current_cluster"
    gcs = address = None
    deadline = time.monotonic() + 180  # a safety net: each step waits on what the head writes or answers
    while True:
        try:
            if gcs is None and gcs_file.exists() and gcs_file.read_text().strip():
                gcs = gcs_file.read_text().strip()
            if gcs is not None and address is None:
                address = _dashboard_address(gcs, env)
            if address is not None:
                with urllib.request.urlopen(_get(f"{address}/api/version"), timeout=2) as r:
                    if r.status == 200:
                        break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the Ray head did not start:\n" + Path(log.name).read_text()[-3000:])
        time.sleep(0.2)
    yield {"jobs": address, "gcs": gcs}
    os.killpg(proc.pid, signal.SIGTERM)  # this head's processes only, not other Ray instances
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(head):
    """The head's job server (dashboard) address, for docpipe submit."""
    return head["jobs"]


@pytest.mark.ray
def test_submit_runs_the_job_on_the_cluster_and_follows_it(ray_head, sample_docs, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "adhoc.yaml"
    config.write_text(f"inputs: ['{sample_docs}']\noutput: {out}\nmodel:\n  name: tiny-random\n  max_new_tokens: 2\n")
    proc = run_cli("submit", "--config", config, "--address", ray_head, "--wait", "--no-progress",
                   "--progress-interval", "1", "--submission-id", "docpipe-test-1",
                   "--env", f"DOCPIPE_CACHE={os.environ['DOCPIPE_CACHE']}", "--env", "HF_HUB_OFFLINE=1", env=AUTH)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("submitted  docpipe-test-1\n")
    assert "documents  6 (error 1, ok 5)" in proc.stdout  # the job's own summary, followed live
    assert "job        docpipe-test-1 SUCCEEDED" in proc.stdout
    # a Ray job has no terminal: it logs progress lines, the last one with the run's final counts
    progress = [line for line in proc.stdout.splitlines() if line.startswith("docpipe: progress: ")]
    assert progress and re.fullmatch(r"docpipe: progress: documents 6/6, pages 9 \(\d+\.\d\d pages/s\), documents "
                                     r"with errors 1, pages with errors 0", progress[-1]), progress
    [manifest] = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert manifest["documents"] == {"ok": 5, "error": 1, "total": 6}
    assert pq.read_table(out / "pages").num_rows == 9
    # the job ran in the uploaded working directory, under Ray's job supervisor
    with urllib.request.urlopen(_get(f"{ray_head}/api/jobs/docpipe-test-1"), timeout=10) as r:
        info = json.load(r)
    assert info["entrypoint"].startswith("python -m docpipe.cli run --config-json")
    assert info["runtime_env"]["working_dir"].startswith("gcs://")
    # and this checkout's docpipe travelled with it, as the package it is installed as
    [package] = info["runtime_env"]["py_modules"]
    assert package.startswith("gcs://")


@pytest.mark.ray
def test_a_failing_job_is_reported_and_a_bad_config_is_never_sent(ray_head, tmp_path):
    proc = run_cli("submit", "--address", ray_head, "--wait", str(tmp_path / "missing"), "--output", tmp_path / "o",
                   "--model", "tiny-random", "--env", f"DOCPIPE_CACHE={os.environ['DOCPIPE_CACHE']}", env=AUTH)
    assert proc.returncode == 1
    assert "docpipe: error: input not found" in proc.stdout and " FAILED" in proc.stdout
    proc = run_cli("submit", "--address", ray_head, "--output", tmp_path / "o", "--batch-size", "0", env=AUTH)
    assert proc.returncode == 2 and "invalid option model.batch_size" in proc.stderr
    assert "submitted" not in proc.stdout
    proc = run_cli("submit", "--address", "http://127.0.0.1:9", "--output", tmp_path / "o", str(tmp_path))
    assert proc.returncode == 2 and "cannot submit to http://127.0.0.1:9" in proc.stderr


@pytest.mark.ray
def test_no_working_dir_uploads_nothing(ray_head, tmp_path):
    """--no-working-dir: the job runs the docpipe the cluster has (here: the head's PYTHONPATH, as an image's
    install would be), and nothing is uploaded."""
    proc = run_cli("submit", "--address", ray_head, "--wait", "--no-working-dir", "--submission-id", "docpipe-nowd",
                   str(tmp_path / "missing"), "--output", tmp_path / "o", "--model", "tiny-random", env=AUTH)
    assert proc.returncode == 1  # the job ran docpipe, which found no input
    assert "docpipe: error: input not found" in proc.stdout
    with urllib.request.urlopen(_get(f"{ray_head}/api/jobs/docpipe-nowd"), timeout=10) as r:
        info = json.load(r)
    assert "working_dir" not in (info["runtime_env"] or {}) and "py_modules" not in (info["runtime_env"] or {})


@pytest.mark.ray
def test_the_job_server_refuses_requests_without_the_token(ray_head):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head}/api/version", timeout=10)
    assert refused.value.code in (401, 403)


def new_user() -> list[str]:
    """For `docpipe run` joining the head as a new user would: none of this session's Ray variables (token mode,
    set by any local Ray started before; loopback binding), only the RAY_ADDRESS and token a test gives."""
    return [name for name in os.environ if name.startswith("RAY_")]


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()  # Ray's repeated connection warnings are kept off the terminal
    assert line.startswith("docpipe: error: ")
    return line


@pytest.mark.ray
def test_run_joins_a_token_cluster_with_only_the_address_and_token(head, sample_docs, tiny_checkpoint, tmp_path):
    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()
    for name in ("receipt.png", "corrupt.pdf"):
        (docs / name).write_bytes((sample_docs / name).read_bytes())
    proc = run_cli("run", docs, "--output", out, "--model", "tiny-random", "--max-new-tokens", "2", "--no-progress",
                   env={"RAY_ADDRESS": head["gcs"], "RAY_AUTH_TOKEN": TOKEN}, unset=new_user(),
                   fresh=True)  # a fresh interpreter: the cluster lists this driver by its command line (below)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "documents  2 (error 1, ok 1)" in proc.stdout
    [manifest] = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert manifest["documents"] == {"ok": 1, "error": 1, "total": 2}
    pages_t = pq.read_table(out / "pages").drop_columns(["ingest_date"])
    docs_t = pq.read_table(out / "documents").drop_columns(["ingest_date"])
    assert pages_t.schema.remove_metadata() == PAGES_SCHEMA.remove_metadata()
    assert docs_t.schema.remove_metadata() == DOCUMENTS_SCHEMA.remove_metadata()
    [page] = [PageRow(**r) for r in pages_t.to_pylist()]
    assert page.source_uri == str(docs / "receipt.png") and page.status == "ok"
    by_name = {Path(d.source_uri).name: d for d in (DocumentRow(**r) for r in docs_t.to_pylist())}
    assert by_name["receipt.png"].status == "ok" and by_name["corrupt.pdf"].status == "error"
    # the work ran on the head's workers: this driver joined the cluster rather than starting its own
    with urllib.request.urlopen(_get(f"{head['jobs']}/api/jobs/"), timeout=10) as r:
        drivers = [j for j in json.load(r) if j["type"] == "DRIVER"]
    assert any("docpipe.cli" in (j.get("entrypoint") or "") and j["status"] == "SUCCEEDED" for j in drivers)


@pytest.mark.ray
def test_run_without_the_token_or_with_a_wrong_one_is_one_line(head, tiny_checkpoint, sample_docs, tmp_path):
    # no progress line beside the one error line, however slowly the join fails on a loaded machine
    args = ("run", sample_docs, "--output", tmp_path / "out", "--model", "tiny-random", "--progress-interval", "3600")
    proc = run_cli(*args, env={"RAY_ADDRESS": head["gcs"]}, unset=new_user(), timeout=60)
    assert _one_error_line(proc) == (
        f"docpipe: error: the Ray cluster at {head['gcs']} requires a token: export RAY_AUTH_TOKEN=<the cluster's "
        "token> (`ray get-auth-token` on the head), or RAY_AUTH_TOKEN_PATH=<its file>")
    token_file = tmp_path / "token"
    token_file.write_text(secrets.token_hex(32))
    proc = run_cli(*args, env={"RAY_ADDRESS": head["gcs"], "RAY_AUTH_TOKEN_PATH": str(token_file)}, unset=new_user(),
                   timeout=60)
    assert "refused the token: set RAY_AUTH_TOKEN" in _one_error_line(proc)
    assert not list((tmp_path / "out").rglob("*.parquet")) and not list((tmp_path / "out").rglob("*.json"))


def test_run_against_a_port_where_nothing_listens_or_a_dashboard_address_is_one_line(tiny_checkpoint, sample_docs, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    proc = run_cli("run", sample_docs, "--output", tmp_path / "out", "--model", "tiny-random",
                   "--progress-interval", "3600", env={"RAY_ADDRESS": address, "RAY_AUTH_TOKEN": TOKEN},
                   unset=new_user(), timeout=60)
    assert _one_error_line(proc) == (
        f"docpipe: error: no Ray cluster answers at {address} (Connection refused): start one with "
        "`ray start --head`, or set RAY_ADDRESS to the head's GCS address (HOST:6379 by default)")
    proc = run_cli("run", sample_docs, "--output", tmp_path / "out", "--model", "tiny-random",
                   "--progress-interval", "3600", env={"RAY_ADDRESS": "http://127.0.0.1:8265"}, unset=new_user(),
                   timeout=60)
    assert "is a dashboard (job server) address: docpipe run joins the cluster's GCS address" in _one_error_line(proc)


_SET_CLUSTER_RAY_VERSION = """
import json, sys
import ray
from ray._common.usage import usage_constants
from ray._private import ray_constants
from ray._raylet import GcsClient

client = GcsClient(address=sys.argv[1])
key, namespace = usage_constants.CLUSTER_METADATA_KEY, ray_constants.KV_NAMESPACE_CLUSTER
metadata = json.loads(client.internal_kv_get(key, namespace=namespace))
metadata["ray_version"] = sys.argv[2] if len(sys.argv) > 2 else ray.__version__
client.internal_kv_put(key, json.dumps(metadata).encode(), overwrite=True, namespace=namespace)
"""


@pytest.mark.ray
def test_run_on_a_cluster_of_another_ray_version_is_one_line(head, tiny_checkpoint, sample_docs, tmp_path):
    import ray

    def set_version(*version):  # what the head recorded at start, which joining drivers check theirs against
        subprocess.run([sys.executable, "-c", _SET_CLUSTER_RAY_VERSION, head["gcs"], *version], check=True,
                       env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}, timeout=120)

    set_version("2.59.0")
    try:
        proc = run_cli("run", sample_docs, "--output", tmp_path / "out", "--model", "tiny-random",
                       env={"RAY_ADDRESS": head["gcs"], "RAY_AUTH_TOKEN": TOKEN}, unset=new_user(), timeout=60)
    finally:
        set_version()
    python = ".".join(map(str, sys.version_info[:3]))
    assert _one_error_line(proc) == (
        f"docpipe: error: version mismatch with the Ray cluster at {head['gcs']}: it runs Ray 2.59.0 on Python "
        f"{python}, this machine Ray {ray.__version__} on Python {python}: install the cluster's versions here")


def test_secret_catalog_properties_are_refused_before_anything_is_sent(tmp_path):
    """Masked, they broke the job's lake step ('token': '**********' in the entrypoint); sent, they would show in
    Ray's job APIs. The refusal names pyiceberg's variables that carry them to the cluster instead."""
    from docpipe.execute.submit import job_entrypoint

    proc = run_cli("submit", "--address", "http://127.0.0.1:9", str(tmp_path), "--output", tmp_path / "o",
                   "--iceberg-catalog", "type=rest", "--iceberg-catalog", "uri=https://cat.example",
                   "--iceberg-catalog", "token=t0ken-value", "--iceberg-catalog", "s3.secret-access-key=abc")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("docpipe: error: secret Iceberg catalog properties are not sent with a job "
                           "(token, s3.secret-access-key)")
    assert "--env PYICEBERG_CATALOG__DOCPIPE__TOKEN=..." in line
    assert "--env PYICEBERG_CATALOG__DOCPIPE__S3__SECRET_ACCESS_KEY=..." in line
    assert "cannot submit" not in proc.stderr and "t0ken-value" not in proc.stderr

    with pytest.raises(ConfigError, match=r"\(uri\)"):
        job_entrypoint(RunConfig(output="s3://b/o", iceberg={"catalog": {"type": "sql",
                                                                          "uri": "postgresql://u:pw@h/db"}}))
    catalog = {"type": "sql", "uri": "postgresql://h/db", "warehouse": "s3://wh"}
    entrypoint = job_entrypoint(RunConfig(output="s3://b/o", iceberg={"catalog": catalog}))
    sent = json.loads(shlex.split(entrypoint)[-1])
    assert sent["iceberg"]["catalog"] == catalog  # the job gets the real values, none masked


def test_a_job_carries_its_local_paths_made_absolute_and_its_uris_as_given(tmp_path, monkeypatch):
    """The job runs in its own working directory: a relative path must mean there what it meant here."""
    from docpipe.execute.submit import job_entrypoint

    monkeypatch.chdir(tmp_path)
    entry = job_entrypoint(RunConfig(inputs=["in", "s3://bucket/in/"], output="out/run", manifests=["m.jsonl"]))
    words = shlex.split(entry)
    assert words[:5] == ["python", "-m", "docpipe.cli", "run", "--config-json"]
    sent = json.loads(words[5])
    assert sent["inputs"] == [str(tmp_path / "in"), "s3://bucket/in/"]
    assert sent["output"] == str(tmp_path / "out" / "run") and sent["manifests"] == [str(tmp_path / "m.jsonl")]
    assert RunConfig(**sent).output == str(tmp_path / "out" / "run")  # what the job's run reads back


@pytest.mark.parametrize("field", ["access_key_id", "secret_access_key", "session_token"])
def test_explicit_storage_credentials_are_refused_before_anything_is_sent(tmp_path, field):
    """The entrypoint shows in Ray's dashboard and job APIs: a credential in the configuration is refused, in one
    line that says where it goes instead, before the job server is contacted (nothing listens at port 9)."""
    secret = "Cr3d-" + secrets.token_hex(8)
    config = tmp_path / "job.yaml"
    config.write_text(f"inputs: ['s3://bucket/in/']\noutput: s3://bucket/out\nstorage:\n  {field}: {secret}\n")
    proc = run_cli("submit", "--config", config, "--address", "http://127.0.0.1:9")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line == ("docpipe: error: explicit storage credentials are not sent with a job: give them to the cluster "
                    "(instance roles, or --env AWS_ACCESS_KEY_ID=... and friends)")
    assert "submitted" not in proc.stdout and secret not in proc.stdout + proc.stderr


def test_run_at_an_address_that_never_replies_gives_up_after_the_probe_timeout_in_one_line(tiny_checkpoint,
                                                                                          sample_docs, tmp_path):
    """Something holds the port but never completes a connection (a listener whose queue is full: Linux drops the
    SYN, as a firewall would): the 5 s check stops the run with one line rather than Ray's long retries."""
    import socket

    from docpipe.execute.cluster import PROBE_TIMEOUT_S

    with socket.socket() as server, socket.socket() as queued:
        server.bind(("127.0.0.1", 0))
        server.listen(0)  # an accept queue of one, never accepted
        port = server.getsockname()[1]
        address = f"127.0.0.1:{port}"
        queued.connect(("127.0.0.1", port))  # completes, and fills the queue: the next SYN is dropped
        proc = run_cli("run", sample_docs / "receipt.png", "--output", tmp_path / "out", "--model", "tiny-random",
                       env={"RAY_ADDRESS": address}, unset=new_user(), timeout=120)
    assert PROBE_TIMEOUT_S == 5.0
    assert _one_error_line(proc) == (
        f"docpipe: error: no Ray cluster answers at {address} (no reply within 5 s): check RAY_ADDRESS (HOST:PORT of "
        "the head's GCS, 6379 by default) and that the host is reachable")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.json"))


@pytest.mark.ray
def test_run_joins_with_the_token_in_the_file_ray_auth_token_path_names(head, sample_docs, tiny_checkpoint,
                                                                       tmp_path):
    """RAY_AUTH_TOKEN_PATH alone (no RAY_AUTH_TOKEN) turns token mode on and joins; a path naming no file is one
    line before Ray is asked."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    out = tmp_path / "out"
    proc = run_cli("run", sample_docs / "receipt.png", "--output", out, "--model", "tiny-random", "--max-new-tokens",
                   "2", "--no-progress", env={"RAY_ADDRESS": head["gcs"], "RAY_AUTH_TOKEN_PATH": str(token_file)},
                   unset=new_user())
    assert proc.returncode == 0, proc.stderr[-3000:]
    [manifest] = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert manifest["documents"]["ok"] == manifest["documents"]["total"] == manifest["pages"]["ok"] == 1
    proc = run_cli("run", sample_docs / "receipt.png", "--output", tmp_path / "o2", "--model", "tiny-random",
                   env={"RAY_ADDRESS": head["gcs"], "RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")}, unset=new_user(),
                   timeout=60)
    assert _one_error_line(proc) == f"docpipe: error: RAY_AUTH_TOKEN_PATH names no file: {tmp_path / 'nope'}"


_SET_CLUSTER_PYTHON_VERSION = _SET_CLUSTER_RAY_VERSION.replace('metadata["ray_version"]', 'metadata["python_version"]')


@pytest.mark.ray
def test_run_on_a_cluster_of_another_python_version_is_one_line(head, tiny_checkpoint, sample_docs, tmp_path):
    import ray

    python = ".".join(map(str, sys.version_info[:3]))

    def set_python(version):  # what the head recorded at start, which joining drivers check theirs against
        subprocess.run([sys.executable, "-c", _SET_CLUSTER_PYTHON_VERSION, head["gcs"], version], check=True,
                       env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}, timeout=120)

    set_python("3.9.7")
    try:
        proc = run_cli("run", sample_docs, "--output", tmp_path / "out", "--model", "tiny-random",
                       env={"RAY_ADDRESS": head["gcs"], "RAY_AUTH_TOKEN": TOKEN}, unset=new_user(), timeout=60)
    finally:
        set_python(python)
    assert _one_error_line(proc) == (
        f"docpipe: error: version mismatch with the Ray cluster at {head['gcs']}: it runs Ray {ray.__version__} on "
        f"Python 3.9.7, this machine Ray {ray.__version__} on Python {python}: install the cluster's versions here")
