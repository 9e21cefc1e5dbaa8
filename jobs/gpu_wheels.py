"""Wheels for ``docpipe bench --gpu-check`` on the lent GPU machine, and their installation there.

That machine has Python 3.12, torch 2.11, transformers 5.17 and pyarrow, and no Ray, PyMuPDF or flash-attn; it
reaches no package registry, and files travel to it in one folder of at most 64 MiB per call.

- ``python -m docpipe.jobs.gpu_wheels fetch`` (here, ``make gpu-wheels``): docpipe's own wheel and the binary wheels the
  check needs there into ``.whl/`` (git-ignored), for Python 3.12 on manylinux x86_64; fails over 64 MiB. A
  transformers newer than the machine's is carried when pyproject.toml's floor is above it (or ``--transformers``).
- ``python3 -m docpipe.jobs.gpu_wheels install`` (there): installs into ``.gpu-site/`` (put it on PYTHONPATH) docpipe, the
  carried transformers, and every other carried wheel the machine lacks or has too old for what is installed, so
  nothing it already has (torch, its torchvision) is replaced without need.
"""

from __future__ import annotations

import argparse
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
LIMIT = 64 * 2**20  # bytes one call carries to the GPU machine

# What the GPU machine has (told, not probed: it is not reachable from here).
MACHINE = {"python": "3.12", "torch": "2.11", "transformers": "5.17"}
# What `docpipe bench --gpu-check` imports beyond that machine's torch, transformers and pyarrow (found by running
# it with everything else unimportable: tests/test_bench.py), at the versions constraints.txt pins here.
# torchvision: transformers' fast image processor, matched to the machine's torch 2.11 (installed there only if
# missing). Pillow: the drawn pages (installed only if missing).
NEEDED = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "pillow"]
TORCHVISION_FOR_TORCH = {"2.11": "0.26.0"}
# With a carried transformers: the hub release that both 5.17's (<2) and 5.21's (>=1.31) requirements admit,
# installed there only if the machine's is too old. tokenizers and safetensors: 5.17 and 5.21 ask for the same.
HUB_FOR_CARRIED_TRANSFORMERS = "1.33.0"
PLATFORM = ["--python-version", MACHINE["python"], "--implementation", "cp",
            # pip does not count an older manylinux tag as compatible with the one named: name each
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64"]


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


def fetch(transformers: str | None) -> int:
    if WHEELS.exists():
        for old in WHEELS.glob("*.whl"):
            old.unlink()
    WHEELS.mkdir(exist_ok=True)
    pins = _pins()
    wanted = [f"{name}=={pins[name]}" for name in NEEDED]
    wanted.append(f"torchvision=={TORCHVISION_FOR_TORCH[MACHINE['torch']]}")
    floor = transformers_floor()
    if transformers is None and _newer(floor, MACHINE["transformers"]):
        transformers = floor if floor.count(".") == 2 else f"{floor}.0"
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
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", *PLATFORM, "--quiet", "-d", str(WHEELS),
                    *wanted], check=True)
    total = 0
    for wheel in sorted(WHEELS.glob("*.whl")):
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.2f} MiB  in all (limit {LIMIT / 2**20:.0f} MiB); transformers carried: "
          f"{transformers or 'no, the machine has ' + MACHINE['transformers'] + ' and the floor is ' + floor}")
    if total >= LIMIT:
        print("too large to carry in one call", file=sys.stderr)
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
    # docpipe always; a carried transformers always (it was carried to replace the machine's)
    chosen = {n for n in carried if n in ("docpipe", "transformers")}
    chosen |= {n for n in carried if _installed(n) is None}
    todo, problems = list(chosen), []
    while todo:  # what each chosen wheel requires, where the machine's version does not do
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
        print("the machine's own kept: " + ", ".join(f"{n} {_installed(n)}" for n in kept))
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--upgrade",
                        "--target", str(SITE), *paths], check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):  # no pip there: a wheel is a zip of its files
        for p in paths:
            zipfile.ZipFile(p).extractall(SITE)
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docpipe.jobs.gpu_wheels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="here: fill .whl/ for the GPU machine")
    f.add_argument("--transformers", metavar="VERSION",
                   help="carry this transformers (default: pyproject.toml's floor, if above the machine's "
                   f"{MACHINE['transformers']})")
    sub.add_parser("install", help="there: install what the machine lacks from .whl/ into .gpu-site/")
    args = parser.parse_args(argv)
    return fetch(args.transformers) if args.action == "fetch" else install()


if __name__ == "__main__":
    sys.exit(main())
