"""The Kubernetes manifests parse, carry what KubeRay and Kubernetes require, and fit the job configs they run."""

import re
import shlex

import pytest
import yaml

from docpipe.cli import load_config_file
from docpipe.config import RunConfig
from tests.conftest import REPO

INFRA = REPO / "infra"
IMAGE_JOBS = "/home/ray/docpipe/jobs/"  # where the Dockerfile puts jobs/
_QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "": 1}


def pinned(package: str) -> str:
    """The version constraints.txt pins (what make setup and the image install), not whatever is installed here:
    a Ray release after the pin must not break the tests on a fresh machine."""
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    return {k.lower(): v for k, v in pins.items()}[package]


def gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(quantity)).groups()
    return float(number) * _QUANTITY[unit] / 2**30


def docs() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(INFRA.glob("*.yaml"))}


def ray_clusters() -> list[tuple[str, dict, dict | None]]:
    """(where, RayCluster spec, the job config it runs or None) for every cluster spec in infra/."""
    found = []
    for name, items in docs().items():
        for d in items:
            if d["kind"] == "RayCluster":
                found.append((name, d["spec"], None))
            if d["kind"] == "ConfigMap":
                for key, text in d["data"].items():
                    job = yaml.safe_load(text)
                    if job.get("kind") == "RayJob" and "rayClusterSpec" in job["spec"]:
                        found.append((f"{name}:{key}", job["spec"]["rayClusterSpec"], job))
    return found


def ray_jobs() -> list[tuple[str, dict]]:
    found = []
    for name, items in docs().items():
        for d in items:
            if d["kind"] == "RayJob":
                found.append((name, d))
            if d["kind"] == "ConfigMap":
                found += [(f"{name}:{k}", yaml.safe_load(t)) for k, t in d["data"].items()
                          if yaml.safe_load(t).get("kind") == "RayJob"]
    return found


def job_config(entrypoint: str) -> RunConfig:
    args = shlex.split(entrypoint)
    assert args[:2] == ["docpipe", "run"], entrypoint
    path = args[args.index("--config") + 1]
    assert path.startswith(IMAGE_JOBS), path
    return RunConfig.model_validate(load_config_file(str(REPO / "jobs" / path[len(IMAGE_JOBS):])))


def test_every_manifest_parses_and_names_its_kind():
    found = docs()
    assert {"raycluster.yaml", "rayjob-adhoc.yaml", "nightly-cronjob.yaml"} <= set(found)
    for name, items in found.items():
        for d in items:
            assert d["apiVersion"] and d["kind"], name
            assert d["metadata"].get("name") or d["metadata"].get("generateName"), name


@pytest.mark.parametrize("where,spec,job", ray_clusters(), ids=lambda v: v if isinstance(v, str) else "")
def test_clusters_have_a_cpu_head_a_cpu_render_group_and_a_gpu_model_group(where, spec, job):
    assert spec["rayVersion"].split(".")[:2] == pinned("ray").split(".")[:2]  # the Ray the image installs
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    containers = [c for g in groups.values() for c in g["template"]["spec"]["containers"]]
    containers += spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert len({c["image"] for c in containers}) == 1  # one image: the same docpipe everywhere
    for c in containers:
        res = c["resources"]
        assert res["requests"] == res["limits"], c["name"]  # Guaranteed QoS: Ray sizes itself from the limits
    gpu = [g for g in groups.values() if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    cpu = [g for g in groups.values() if g not in gpu]
    assert len(gpu) == 1 and len(cpu) == 1
    assert gpu[0]["minReplicas"] <= gpu[0]["replicas"] <= gpu[0]["maxReplicas"]


@pytest.mark.parametrize("where,job", ray_jobs(), ids=lambda v: v if isinstance(v, str) else "")
def test_ray_jobs_run_a_shipped_config_that_fits_their_gpu_pods(where, job):
    config = job_config(job["spec"]["entrypoint"])
    if "rayClusterSpec" in job["spec"]:
        spec = job["spec"]["rayClusterSpec"]
        assert job["spec"]["shutdownAfterJobFinishes"] is True  # a scheduled run pays for its cluster only while it runs
    else:  # the standing cluster
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "docpipe"}
        [spec] = [d["spec"] for d in docs()["raycluster.yaml"] if d["kind"] == "RayCluster"]
    [gpu] = [g for g in spec["workerGroupSpecs"]
             if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    actors_per_pod = gpus_per_pod * config.actors_per_gpu
    # every model actor's reserved host memory, plus room for Ray and the render tasks, fits the pod
    assert actors_per_pod * config.actor_memory_gb + 4 <= gib(limits["memory"])
    assert int(limits["cpu"]) >= actors_per_pod  # each model actor asks Ray for one CPU beside its GPU
    if config.num_actors:
        assert config.num_actors <= gpu["maxReplicas"] * actors_per_pod
    assert config.model.name != "tiny-random" and not config.fail_fast and config.executor == "ray"


def test_the_nightly_schedule_cannot_overlap_and_may_create_ray_jobs():
    items = {d["kind"]: d for d in docs()["nightly-cronjob.yaml"]}
    cron = items["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["timeZone"] == "Etc/UTC"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == items["ServiceAccount"]["metadata"]["name"]
    [rule] = items["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and {"create", "get"} <= set(rule["verbs"])
    assert items["RoleBinding"]["roleRef"]["name"] == items["Role"]["metadata"]["name"]
    assert pod["volumes"][0]["configMap"]["name"] == items["ConfigMap"]["metadata"]["name"]
    # the pod waits for its RayJob (so Forbid means something) and fails when the run fails
    script = pod["containers"][0]["command"][-1]
    assert "kubectl create -f /templates/rayjob.yaml" in script and '[ "$status" = SUCCEEDED ]' in script
    assert job_config(yaml.safe_load(items["ConfigMap"]["data"]["rayjob.yaml"])["spec"]["entrypoint"]).resume


def test_the_image_installs_docpipe_with_its_gpu_extra_and_ships_the_job_configs():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(rf"FROM rayproject/ray:{re.escape(pinned('ray'))}-py3\d+-cu\d+", text)
    assert "COPY --chown=ray:users pyproject.toml README.md constraints.txt ./" in text
    assert "COPY --chown=ray:users jobs ./jobs" in text and "WORKDIR /home/ray/docpipe" in text
    assert 'pip install --no-cache-dir -c constraints.txt ".[gpu,iceberg]"' in text
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"ray\[data,default[],]', pyproject)  # the Job Submission server and client


def test_setup_installs_the_pins_and_make_lock_refreshes_them():
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --quiet -c constraints.txt -e '.[dev]'" in makefile
    assert "$(VENV)/.docpipe-installed: pyproject.toml constraints.txt" in makefile  # new pins, new install
    assert "\nlock:" in makefile and "pip freeze --exclude-editable --exclude docpipe" in makefile
    lines = [ln for ln in (REPO / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[^\s=]+", ln) for ln in lines), "pins only: name==version"
    for package in ("ray", "torch", "transformers", "pymupdf", "pyarrow", "pydantic", "pytest", "moto"):
        assert pinned(package)


def test_killed_processes_are_reaped_in_the_images_and_pods():
    """A run killed in a container must not stay a zombie (docs/contract.md, the lease): `docker run` starts the
    image under tini; KubeRay replaces the entrypoint, so every Ray pod shares one PID namespace, whose PID 1 (the
    pause process) reaps."""
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"apt-get install -y --no-install-recommends [^\n]*\btini\b", text)
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in text
    found = 0
    for where, spec, _ in ray_clusters():
        for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            assert template["spec"].get("shareProcessNamespace") is True, where
            found += 1
    assert found >= 6  # the standing cluster's and the nightly job's: a head and two worker groups each
