"""Ad-hoc submission: `docpipe submit` to a real Ray head started on loopback by the test."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, _free_port, run_cli


TOKEN = secrets.token_hex(32)
AUTH = {"RAY_AUTH_TOKEN": TOKEN}  # what a user exports; docpipe submit turns token mode on for it


def _get(url: str) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, docpipe_cache):
    """`ray start --head` with its dashboard (the job server) on 127.0.0.1, as its own process group, with
    token authentication on (Ray's default for clusters): clients need RAY_AUTH_TOKEN."""
    port, dashboard = _free_port(), _free_port()
    temp = tmp_path_factory.mktemp("ray-head")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    env.pop("RAY_ADDRESS", None)
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # as in an activated environment: jobs run `python`
    ray = os.path.join(bin_dir, "ray")
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
         "--temp-dir", str(temp), "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(_get(f"{address}/api/version"), timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("the Ray head did not start")
        time.sleep(0.5)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)  # this head's processes only, not other Ray instances
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


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
    [manifest] = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert manifest["documents"] == {"ok": 5, "error": 1, "total": 6}
    assert pq.read_table(out / "pages").num_rows == 9
    # the job ran in the uploaded working directory, under Ray's job supervisor
    with urllib.request.urlopen(_get(f"{ray_head}/api/jobs/docpipe-test-1"), timeout=10) as r:
        info = json.load(r)
    assert info["entrypoint"].startswith("python -m pipeline.cli run --config-json")
    assert info["runtime_env"]["working_dir"].startswith("gcs://")


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


def test_no_working_dir_uploads_nothing(ray_head, tmp_path):
    """--no-working-dir: the job runs the docpipe the cluster has (here: the head's PYTHONPATH, as an image's
    install would be), and nothing is uploaded."""
    proc = run_cli("submit", "--address", ray_head, "--wait", "--no-working-dir", "--submission-id", "docpipe-nowd",
                   str(tmp_path / "missing"), "--output", tmp_path / "o", "--model", "tiny-random", env=AUTH)
    assert proc.returncode == 1  # the job ran docpipe, which found no input
    assert "docpipe: error: input not found" in proc.stdout
    with urllib.request.urlopen(_get(f"{ray_head}/api/jobs/docpipe-nowd"), timeout=10) as r:
        info = json.load(r)
    assert "working_dir" not in (info["runtime_env"] or {})
