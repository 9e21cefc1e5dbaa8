import os
import sys

# Before anything imports transformers or starts Ray (whose workers inherit the environment).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.pop("RAY_ADDRESS", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def docpipe_cache(tmp_path_factory):
    """One tiny checkpoint per test session, shared by the driver, Ray workers and CLI subprocesses."""
    cache = os.environ.get("DOCPIPE_TEST_CACHE") or str(tmp_path_factory.mktemp("docpipe-cache"))
    os.environ["DOCPIPE_CACHE"] = cache
    return Path(cache)


@pytest.fixture(scope="session")
def tiny_checkpoint(docpipe_cache):
    from pipeline.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from pipeline.config import ModelOptions
    from pipeline.model import load_model

    return load_model(ModelOptions(name="tiny-random", max_new_tokens=6), str(tiny_checkpoint))


@pytest.fixture(scope="session")
def sample_docs(tmp_path_factory):
    """The demo documents (multi-page PDFs, JPEG scan, receipt PNG, 2-page TIFF) plus one corrupt 'PDF'."""
    from jobs.demo import make_samples

    folder = tmp_path_factory.mktemp("docs")
    make_samples(folder)
    (folder / "corrupt.pdf").write_bytes(os.urandom(4096))
    return folder


@pytest.fixture(scope="session")
def ray_local(docpipe_cache):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def run_cli(*args, env=None, timeout=600):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
