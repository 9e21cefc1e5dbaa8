"""Wheels for ``docpipe bench --gpu-check`` and the GPU test tier on an offline GPU host, and the one command run there.

Such a host has its own Python, torch (with CUDA) and pyarrow, usually a transformers too, and no package registry:
wheels are copied in beside the checkout, and the work is one command under a time limit. No Ray, PyMuPDF or
flash-attn is needed there.

- ``python -m docpipe.jobs.gpu_wheels fetch`` (on a machine with a registry; ``make gpu-wheels``): docpipe's own wheel and
  the binary wheels the check and the test tier need into ``.whl/`` (git-ignored), for the host's Python on manylinux
  x86_64, with the transformers this checkout pins (what production runs: ``--transformers host`` to use the host's,
  or a version), and pytest for the test tier.
- ``python3 jobs/gpu_wheels.py run --json FILE`` (on the host, from the checkout's root, under ``timeout``): installs
  into ``.gpu-site/`` what the host lacks or has too old, then runs ``bench --gpu-check`` (its JSON where --json
  says) and the test tier's tiny-model part, each under its own time limit; exits non-zero if either failed.
- ``python3 jobs/gpu_wheels.py install``: the installation alone (put ``.gpu-site`` on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".whl"
SITE = REPO / ".gpu-site"
MAX_MIB = 64  # default cap on what fetch gathers (--max-mib): the wheels are copied to the host each time

# The host the defaults are for: Python 3.12 and torch 2.11 (--python, --torch to change them).
HOST = {"python": "3.12", "torch": "2.11"}
# What `docpipe bench --gpu-check` and tests/gpu import beyond the host's torch, transformers and pyarrow (found by
# running the check with everything else unimportable: tests/test_bench.py), at the versions constraints.txt pins.
# torchvision: transformers' fast image processor, matched to the host's torch (installed only if missing).
# Pillow: the drawn pages (installed only if missing). pytest and what it imports: the test tier.
NEEDED = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "pillow",
          "pytest", "pluggy", "iniconfig", "pygments"]
TORCHVISION_FOR_TORCH = {"2.11": "0.26.0", "2.12": "0.27.0", "2.13": "0.28.0", "2.14": "0.29.1"}
# With a carried transformers: a hub release that 5.17's (<2) and 5.21 on (>=1.31) admit, installed there only if
# the host's is too old. tokenizers and safetensors: 5.17 and 5.24 ask for the same ranges.
HUB_FOR_CARRIED_TRANSFORMERS = "1.33.0"
# The documented run's limits, seconds: together under 10 minutes with installation and start-up.
CHECK_TIMEOUT_S = 390
TESTS_TIMEOUT_S = 150
# The test tier's tiny-model part (idefics2-8b's architecture is the check's; QLoRA needs peft and bitsandbytes).
TESTS = ["tests/gpu", "-q", "-rs", "-p", "no:cacheprovider", "-k", "not idefics2_8b and not qlora"]


def _platform(python: str) -> list[str]:
    # pip does not count an older manylinux tag as compatible with the one named: name each
    return ["--python-version", python, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[_norm(name)] = version.strip()
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def transformers_floor() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"transformers>=([0-9.]+)', text).group(1)


def _newer(a: str, b: str) -> bool:
    return tuple(int(x) for x in a.split(".")[:3]) > tuple(int(x) for x in b.split(".")[:3])


def fetch(transformers: str | None = "pin", python: str = HOST["python"], torch: str = HOST["torch"],
          max_mib: float = MAX_MIB) -> int:
    """``transformers``: "pin" (constraints.txt's, the default), "host" (carried only when pyproject.toml's floor is
    above 5.17, the oldest host transformers this was checked with), or a version."""
    if WHEELS.exists():
        for old in WHEELS.glob("*.whl"):
            old.unlink()
    WHEELS.mkdir(exist_ok=True)
    pins = _pins()
    wanted = [f"{name}=={pins[name]}" for name in NEEDED]
    if torch not in TORCHVISION_FOR_TORCH:
        print(f"no torchvision known for torch {torch}: {sorted(TORCHVISION_FOR_TORCH)}", file=sys.stderr)
        return 2
    wanted.append(f"torchvision=={TORCHVISION_FOR_TORCH[torch]}")
    floor = transformers_floor()
    if transformers == "pin":
        transformers = pins["transformers"]
    elif transformers == "host":
        transformers = (floor if floor.count(".") == 2 else f"{floor}.0") if _newer(floor, "5.17") else None
    if transformers:
        wanted += [f"transformers=={transformers}", f"huggingface-hub=={HUB_FOR_CARRIED_TRANSFORMERS}"]
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:  # from a clean copy: a stale build/ folder never leaks into the wheel
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, Path(tmp) / name)
        for package in ("pipeline", "schemas", "jobs"):
            shutil.copytree(REPO / package, Path(tmp) / package, ignore=shutil.ignore_patterns("__pycache__"))
        built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(WHEELS),
                                tmp], capture_output=True, text=True)
    if built.returncode:  # setuptools' deprecation notices are noise unless the build failed
        print(built.stdout + built.stderr, file=sys.stderr)
        return built.returncode
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", *_platform(python), "--quiet", "-d",
                    str(WHEELS), *wanted], check=True)
    total = 0
    for wheel in sorted(WHEELS.glob("*.whl")):
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.2f} MiB in all (cap {max_mib:g} MiB); transformers carried: "
          f"{transformers or 'no: the host has its own and the floor is ' + floor}")
    if total >= max_mib * 2**20:
        print(f"over the {max_mib:g} MiB cap (--max-mib)", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ there
def _wheel_meta(path: Path) -> tuple[str, str, list[str]]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    field = lambda key: [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(key + ":")]  # noqa: E731
    return _norm(field("Name")[0]), field("Version")[0], field("Requires-Dist")


def _installed(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def install() -> int:
    from packaging.requirements import Requirement

    carried = {}
    for path in sorted(WHEELS.glob("*.whl")):
        name, version, requires = _wheel_meta(path)
        carried[name] = (version, requires, path)
    # docpipe always; a carried transformers always (it was carried to replace the host's)
    chosen = {n for n in carried if n in ("docpipe", "transformers")}
    chosen |= {n for n in carried if _installed(n) is None}
    todo, problems = list(chosen), []
    while todo:  # what each chosen wheel requires, where the host's version does not do
        name = todo.pop()
        version, requires, _ = carried[name]
        for spec in requires:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = _norm(req.name)
            if name == "docpipe" and dep not in NEEDED + ["torch", "torchvision", "transformers", "pyarrow", "numpy"]:
                continue  # a run's packages (Ray, PyMuPDF, ...): the check does without them
            have = carried[dep][0] if dep in chosen else _installed(dep)
            if have is not None and req.specifier.contains(have, prereleases=True):
                continue
            if dep in carried and dep not in chosen:
                chosen.add(dep)
                todo.append(dep)
            else:
                problems.append(f"{name} {version} needs {req}, found {have or 'nothing'}")
    SITE.mkdir(exist_ok=True)
    paths = [str(carried[n][2]) for n in sorted(chosen)]
    print("installing into .gpu-site: " + ", ".join(f"{n} {carried[n][0]}" for n in sorted(chosen)))
    kept = sorted(set(carried) - chosen)
    if kept:
        print("the host's own kept: " + ", ".join(f"{n} {_installed(n)}" for n in kept))
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--upgrade",
                        "--target", str(SITE), *paths], check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):  # no pip there: a wheel is a zip of its files
        for p in paths:
            zipfile.ZipFile(p).extractall(SITE)
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def run(json_path: str, model: str, check_timeout: float, tests_timeout: float) -> int:
    """On the host: install, then ``bench --gpu-check`` and the test tier's tiny-model part, each under its limit
    (a stalled one is killed and reported, and the next runs). Non-zero if either failed."""
    install()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO)]), "HF_HUB_OFFLINE": "1"}
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    steps = [("bench --gpu-check", [sys.executable, "-m", "docpipe.cli", "bench", "--gpu-check", "--json", json_path]
              + (["--random-weights", model.removeprefix("random:")] if model.startswith("random:") else
                 ["--model", model]), check_timeout),
             ("tests/gpu", [sys.executable, "-m", "pytest", *TESTS], tests_timeout)]
    failed = []
    for name, command, limit in steps:
        print(f"== {name} (limit {limit:g} s)", flush=True)
        try:
            code = subprocess.run(command, cwd=REPO, env=env, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = f"killed after {limit:g} s"
        if code != 0:
            failed.append(f"{name}: {code}")
    print("== " + ("; ".join(failed) if failed else f"both ok; the check's figures are in {json_path}"), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docpipe.jobs.gpu_wheels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="with a registry: fill .whl/ for the GPU host")
    f.add_argument("--transformers", default="pin", metavar="VERSION|pin|host",
                   help="the transformers to carry: this checkout's pin (default: what production runs), 'host' "
                   "(the host's own, unless pyproject.toml's floor is above it), or a version")
    f.add_argument("--python", default=HOST["python"], help="the host's Python (default %(default)s)")
    f.add_argument("--torch", default=HOST["torch"], help="the host's torch, for a matching torchvision "
                   "(default %(default)s)")
    f.add_argument("--max-mib", type=float, default=MAX_MIB, help="fail above this many MiB (default %(default)s)")
    sub.add_parser("install", help="on the host: install what it lacks from .whl/ into .gpu-site/")
    r = sub.add_parser("run", help="on the host: install, then bench --gpu-check and the test tier's tiny part, each "
                       "under its time limit")
    r.add_argument("--json", required=True, help="where the check writes its figures")
    r.add_argument("--model", default="random:idefics2-8b", help="the check's model (default %(default)s)")
    r.add_argument("--check-timeout", type=float, default=CHECK_TIMEOUT_S, help="seconds (default %(default)s)")
    r.add_argument("--tests-timeout", type=float, default=TESTS_TIMEOUT_S, help="seconds (default %(default)s)")
    args = parser.parse_args(argv)
    if args.action == "fetch":
        return fetch(None if args.transformers == "none" else args.transformers, args.python, args.torch, args.max_mib)
    if args.action == "install":
        return install()
    return run(args.json, args.model, args.check_timeout, args.tests_timeout)


if __name__ == "__main__":
    sys.exit(main())
