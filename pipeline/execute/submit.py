"""Ad-hoc runs on a Ray cluster: `docpipe submit` sends `docpipe run` as a Ray job.

The configuration is validated here, before anything is sent, and travels inside the job's
entrypoint as JSON. Credentials never travel with it: the job reads them from the cluster's
environment (instance roles, or variables given with --env; pyiceberg's PYICEBERG_CATALOG__* for the
catalog's secrets).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from docpipe.execute.cluster import use_token_auth
from docpipe.config import RunConfig
from docpipe.errors import ConfigError, FatalError

# Never uploaded with the working directory (Ray also honours the tree's .gitignore).
EXCLUDES = [".git", ".venv", "demo_output", "*.egg-info", "__pycache__", ".pytest_cache"]
_SECRETS = {"access_key_id", "secret_access_key", "session_token"}


def source_tree() -> str | None:
    """The checkout docpipe runs from, if it is one (not an installed package)."""
    root = Path(__file__).resolve().parents[2]
    return str(root) if (root / "pyproject.toml").exists() and (root / "pipeline").is_dir() else None


def job_entrypoint(config: RunConfig) -> str:
    if any(getattr(config.storage, name) is not None for name in _SECRETS):
        raise ConfigError("explicit storage credentials are not sent with a job: give them to the cluster "
                          "(instance roles, or --env AWS_ACCESS_KEY_ID=... and friends)")
    if config.password is not None:  # masked in the entrypoint it would be useless, in clear it would be shown
        raise ConfigError("a PDF password is not sent with a job: give it to the job's environment (--env "
                          "DOCPIPE_PDF_PASSWORD=...) or as a password_file the cluster can read")
    secret = config.iceberg.secret_properties()
    if secret:
        # The entrypoint is shown by Ray's dashboard and job APIs, so secrets can't go in it, and masked they break
        # the job's lake step. pyiceberg reads catalog properties from the job's environment too.
        name = config.iceberg.catalog_name.upper()
        env = ", ".join(f"--env PYICEBERG_CATALOG__{name}__{k.upper().replace('.', '__').replace('-', '_')}=..."
                        for k in secret)
        raise ConfigError(f"secret Iceberg catalog properties are not sent with a job ({', '.join(secret)}): give "
                          f"them to the cluster's environment instead, e.g. {env}, and leave them out of the "
                          "catalog options")
    # The job runs in its own working directory: local paths are made absolute, so they mean what they meant
    # here (on a cluster sharing this filesystem; elsewhere, use URIs).
    from docpipe.storage import is_remote

    def here(path: str) -> str:
        return path if is_remote(path) else os.path.abspath(path)

    config = config.model_copy(update={"inputs": [here(p) for p in config.inputs], "output": here(config.output),
                                       "manifests": [here(p) for p in config.manifests]})
    files = {k: here(getattr(config, k)) for k in ("markdown", "password_file", "passwords") if getattr(config, k)}
    config = config.model_copy(update=files) if files else config
    payload = json.dumps(config.model_dump(mode="json", exclude_defaults=True), separators=(",", ":"))
    return f"python -m docpipe.cli run --config-json {shlex.quote(payload)}"


def staged_package(tree: str, into: str) -> str:
    """docpipe's own code from a checkout, laid out as the installed package (pipeline/ is docpipe, schemas/ and
    jobs/ inside it), for Ray's py_modules: the job imports ``docpipe`` from it, ahead of any installed copy."""
    import shutil

    package = os.path.join(into, "docpipe")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(os.path.join(tree, "pipeline"), package, ignore=ignore)
    for sub in ("schemas", "jobs"):
        shutil.copytree(os.path.join(tree, sub), os.path.join(package, sub), ignore=ignore)
    return package


def runtime_env(working_dir: str | None, env_vars: dict[str, str], package: str | None = None) -> dict:
    renv: dict = {"env_vars": dict(env_vars)} if env_vars else {}
    if working_dir:
        if not os.path.isdir(working_dir):
            raise ConfigError(f"--working-dir is not a folder: {working_dir}")
        renv.update(working_dir=working_dir, excludes=EXCLUDES)
    if package:
        renv["py_modules"] = [package]
    return renv


def submit(config: RunConfig, address: str, *, working_dir: str | None, env: dict[str, str], wait: bool,
           submission_id: str | None = None, out=sys.stdout) -> int:
    """Submit the run; print the job id; with ``wait``, follow its logs and return 0 only if it succeeded.
    ``env``: variables set in the job's environment (the command line's --env KEY=VALUE, parsed by cli.py)."""
    use_token_auth()  # before Ray is imported
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient
    except ImportError:
        raise FatalError("docpipe submit needs Ray's job client: pip install 'ray[default]'") from None
    entrypoint = job_entrypoint(config)
    import tempfile

    # With a working directory uploaded from this checkout, the job runs this checkout's docpipe too (a cluster
    # without docpipe installed): the folders travel as the package they are installed as.
    tree = source_tree() if working_dir else None
    try:
        with tempfile.TemporaryDirectory(prefix="docpipe-submit-") as staging:
            client = JobSubmissionClient(address)
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env(working_dir, env, staged_package(tree, staging) if tree else None),
                submission_id=submission_id,
                metadata={"tool": "docpipe", "output": config.output},
            )
    except FatalError:
        raise
    except Exception as exc:  # connection refused, a bad address, the server's refusal
        raise FatalError(f"cannot submit to {address}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    print(f"submitted  {job_id}", file=out, flush=True)
    if not wait:
        print(f"follow     ray job logs --address {address} --follow {job_id}", file=out, flush=True)
        return 0
    import asyncio

    async def follow():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", file=out, flush=True)

    asyncio.run(follow())
    import time

    while not client.get_job_status(job_id).is_terminal():  # the log stream may close a moment before
        time.sleep(0.5)
    info = client.get_job_info(job_id)
    print(f"job        {job_id} {info.status}" + (f": {info.message}" if info.message else ""), file=out, flush=True)
    return 0 if info.status == JobStatus.SUCCEEDED else 1
