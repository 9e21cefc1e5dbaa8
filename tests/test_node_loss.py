"""A worker node of a Ray cluster dies mid-run: nothing is lost. In a file of its own (two three-node clusters),
so that `--dist loadfile` can give it to one test worker while the other takes the rest."""

import os
from collections import Counter

import pyarrow.parquet as pq
import pytest

from tests.conftest import start_cli
from tests.test_nothing_lost import check_accounting, wait_for

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("gpus_per_worker", [1, 0], ids=["gpu-workers", "cpu-only"])
def test_a_worker_node_killed_mid_run_loses_nothing(sample_docs, tmp_path, gpus_per_worker, monkeypatch):
    """A three-node Ray cluster on loopback (Ray's own multi-node test harness): a CPU head for the driver and
    rendering, two workers for the model (given a logical GPU each, as in the GPU cluster of infra/, or plain
    CPU nodes). A worker is killed, with its model actor, while that actor holds pages."""
    from ray.cluster_utils import Cluster

    # Every model call announces its node and waits for the test's release (docpipe.execute.run._maybe_hold):
    # the victim is a node whose actor is known to hold work, and the run cannot end before the kill. The nodes'
    # processes take this environment.
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv("DOCPIPE_FAULT_HOLD_MODEL", str(hold))

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        for name in ("report.pdf", "minutes.pdf", "receipt.png"):
            (folder / f"{i}-{name}").write_bytes((sample_docs / name).read_bytes() + f"\n% copy {i}\n".encode())
    inputs = sorted(str(p) for p in folder.iterdir())
    out = tmp_path / "out"
    # Every port the OS's: no dashboard (the hold files say where the actors are, not Ray's state API), and each
    # node's dashboard agent on a port of its own (its default, 52365, is shared by every Ray on the machine).
    node_args = {"node_ip_address": "127.0.0.1", "dashboard_agent_listen_port": 0}
    # The GCS marks a killed node dead after health checks fail: every 0.5 s, twice in a row (Ray's default is
    # every 3 s, five times: 15 s of a test spent waiting for it).
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **node_args,
                                                            "_system_config": health})
    proc = None
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=gpus_per_worker, **node_args) for _ in range(2)]
        cluster.wait_for_nodes()
        args = ["run", folder, "--output", out, "--model", "tiny-random", "--max-new-tokens", "2",
                "--checkpoint-seconds", "0.5", "--no-progress", "--text-layer", "never"]  # every page to the model
        if not gpus_per_worker:
            args += ["--num-actors", "2"]
        proc = start_cli(*args, env={"RAY_ADDRESS": cluster.address})

        def holders():  # worker nodes whose model actor holds a call
            held = {p.name.split(".")[0] for p in hold.iterdir()}
            return [w for w in workers if w.node_id in held]

        # an event: a worker's actor holds pages (a CPU actor can also land on the head; the deadline is a net)
        if not wait_for(holders, proc, 300):
            proc.kill()
            stderr = proc.communicate()[1]
            pytest.fail(f"no worker's model actor took pages: {sorted(os.listdir(hold))}\n{stderr[-3000:]}")
        [victim, *_] = holders()
        assert proc.poll() is None and not list((out / "_runs").glob("*.json"))  # held: it cannot have finished
        cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: its raylet, workers and model actor
        (hold / "release").touch()  # the other actor and the restarted one go on
        stdout, stderr = proc.communicate(timeout=400)
        assert proc.returncode == 0, stderr[-3000:]
    finally:
        (hold / "release").touch()
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    docs = check_accounting(out, inputs)
    assert Counter(d["status"] for d in docs) == {"ok": len(inputs)}
    pages = pq.read_table(out / "pages").to_pylist()
    assert len(pages) == 36 and all(p["status"] == "ok" for p in pages)
    assert Counter(p["source_uri"] for p in pages) == {u: 3 if "report" in u else 2 if "minutes" in u else 1
                                                        for u in inputs}
