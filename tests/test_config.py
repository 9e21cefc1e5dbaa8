import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from docpipe.cli import load_config_file
from docpipe.config import FinetuneConfig, RunConfig
from tests.conftest import REPO, run_cli


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_job_configs_validate(path: Path):
    if path.name.startswith("finetune"):  # a `docpipe finetune` job
        tune = FinetuneConfig.model_validate(load_config_file(str(path)))
        assert tune.train and tune.output
        return
    config = RunConfig.model_validate(load_config_file(str(path)))
    assert config.output and (config.inputs or config.manifests)


def test_unknown_keys_and_wrong_types_are_one_line_errors(tmp_path):
    for body, expected in [
        ("output: out\nmodel:\n  nmae: x\n", "docpipe: error: invalid option model.nmae: Extra inputs are not permitted"),
        ("output: out\nmodel:\n  batch_size: lots\n", "docpipe: error: invalid option model.batch_size:"),
        ("output: out\n!!python/object/apply:os.system ['true']: 1\n", "docpipe: error: cannot read config"),
        ("- just\n- a list\n", "must be a mapping of options"),
    ]:
        path = tmp_path / "job.yaml"
        path.write_text(body)
        proc = run_cli("run", "--config", path, tmp_path)
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert expected in line


def test_config_schema_documents_every_option():
    proc = run_cli("config", "schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert schema["additionalProperties"] is False
    extract = schema["$defs"]["ExtractOptions"]["properties"]
    assert "schema" in extract and extract["page_cap"]["description"]


def test_a_config_file_with_command_line_overrides(sample_docs, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(f"inputs: ['{sample_docs / 'receipt.png'}']\noutput: {tmp_path / 'from-file'}\n"
                    "model:\n  name: tiny-random\n  max_new_tokens: 2\nprogress: false\n"
                    "executor: local\n")  # the subject is the merge of file and flags, before any executor
    proc = run_cli("run", "--config", path, "--output", tmp_path / "from-flag")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "from-file").exists()
    [manifest] = [json.loads(p.read_text()) for p in (tmp_path / "from-flag" / "_runs").glob("*.json")]
    assert manifest["config"]["model"]["max_new_tokens"] == 2 and manifest["config"]["progress"] is False
    pages = pq.read_table(tmp_path / "from-flag" / "pages").to_pylist()
    assert len(pages) == 1 and pages[0]["output_tokens"] <= 2


@pytest.mark.ray
def test_impossible_resources_and_malformed_flags_are_one_line_errors(sample_docs, tmp_path):
    # a local Ray instance can't grow: an actor no node can hold would wait forever, so the run refuses it
    proc = run_cli("run", sample_docs / "receipt.png", "--output", tmp_path / "o", "--model", "tiny-random",
                   "--actor-memory-gb", "100000", "--no-progress")
    assert proc.returncode == 2
    assert "docpipe: error: actor_memory_gb is 100000 but this machine's Ray offers" in proc.stderr.splitlines()[-1]
    proc = run_cli("run", sample_docs, "--output", tmp_path / "o", "--iceberg-catalog", "sqlite")
    assert proc.returncode == 2 and "--iceberg-catalog takes KEY=VALUE, got 'sqlite'" in proc.stderr


def test_a_command_whose_reader_goes_away_ends_quietly():
    """`docpipe config schema | head -1`: the reader closes the pipe after one line; docpipe ends without a
    message and exit 0 (it ended with 'internal error: BrokenPipeError', exit 1). The pipe holds one page, so
    the schema (35 kB) cannot fit in it before the reader is gone."""
    import fcntl
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([sys.executable, "-m", "docpipe.cli", "config", "schema"], cwd=REPO, stdout=write_end,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        assert reader.readline() == b"{\n"
    err = proc.stderr.read().decode()  # the reader is gone (closed above), as head's after its line
    assert proc.wait(timeout=120) == 0, err
    assert err == ""
