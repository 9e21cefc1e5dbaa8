"""The wheel is what travels to a machine without this checkout (an offline GPU host): it must carry every file the
package reads, not only the Python modules."""

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO

# Each folder and where its files sit in the wheel (pyproject.toml installs them under one import name, docpipe).
PACKAGES = {"pipeline": "docpipe", "schemas": "docpipe/schemas", "jobs": "docpipe/jobs"}


def test_the_wheel_carries_every_file_the_package_reads(tmp_path):
    # Built from a copy, so setuptools' build/ and egg-info folders never land in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("docpipe-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())

    def walk(pattern: str) -> list[str]:
        return sorted(f"{there}/{p.relative_to(src / folder)}" for folder, there in PACKAGES.items()
                      for p in (src / folder).rglob(pattern) if p.is_file())

    data = [f for f in walk("*") if not f.endswith(".py")]
    assert "docpipe/model/assets/idefics2-8b.json" in data and "docpipe/tools/templates/report.css" in data  # the walk sees them
    assert [f for f in data if f not in inside] == []
    modules = walk("*.py")
    assert "docpipe/schemas/contract.py" in modules and "docpipe/jobs/gpu_wheels.py" in modules
    assert [f for f in modules if f not in inside] == []
