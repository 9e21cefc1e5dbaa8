"""The wheel is what travels to a machine without this checkout (the GPU machine): it must carry every file the
package reads, not only the Python modules."""

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO

PACKAGES = ("pipeline", "schemas", "jobs")


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

    data = sorted(str(p.relative_to(src)) for package in PACKAGES for p in (src / package).rglob("*")
                  if p.is_file() and p.suffix != ".py")
    assert "pipeline/model/assets/idefics2-8b.json" in data and "pipeline/tools/templates/report.css" in data  # the walk sees them
    assert [f for f in data if f not in inside] == []
    modules = sorted(str(p.relative_to(src)) for package in PACKAGES for p in (src / package).rglob("*.py"))
    assert [f for f in modules if f not in inside] == []
