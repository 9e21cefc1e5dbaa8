"""Object storage against a real S3 server over HTTP (moto in server mode, a separate process)."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyarrow.fs import S3FileSystem

from docpipe.config import StorageOptions
from docpipe.errors import InputError
from docpipe.sources import list_inputs
from docpipe.schemas import DocumentRow, PageRow
from tests.conftest import S3_SECRET, run_cli

ODD_KEY = "in/scans/ünïcode scan ✓.jpg"  # spaces and non-ASCII in a key


def s3fs(env) -> S3FileSystem:
    host = env["AWS_ENDPOINT_URL"].removeprefix("http://")
    return S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1",
                        access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="module")
def docs_bucket(s3, sample_docs):
    s3.create_bucket(Bucket="docs")
    for path in sorted(sample_docs.iterdir()):
        key = ODD_KEY if path.name == "scan.jpg" else f"in/{path.name}"
        s3.put_object(Bucket="docs", Key=key, Body=path.read_bytes())
    return "docs"


def assert_no_secret(*texts):
    for text in texts:
        assert S3_SECRET not in text


@pytest.mark.ray
def test_run_from_s3_to_s3(docs_bucket, s3_env, tmp_path):
    """With the credentials given only in the run's configuration: they work, and the secret appears nowhere,
    not in the output, the manifest, or the logs of Ray's processes."""
    import shutil
    import tempfile

    config = tmp_path / "job.json"
    config.write_text(json.dumps({"storage": {"access_key_id": s3_env["AWS_ACCESS_KEY_ID"],
                                              "secret_access_key": S3_SECRET}}))
    env = {k: v for k, v in s3_env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    ray_tmp = tempfile.mkdtemp(prefix="dp-ray-", dir="/tmp")  # Ray's session and logs; short for its sockets
    try:
        proc = run_cli("run", "s3://docs/in", "--output", "s3://docs/out", "--model", "tiny-random", "--config",
                       config, "--max-new-tokens", "3", "--no-progress", env={**env, "RAY_TMPDIR": ray_tmp})
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and "/logs/" in str(p)]
        assert any(p.name.startswith("worker-") for p in logs) and sum(p.stat().st_size for p in logs) > 0
        for path in logs:
            assert S3_SECRET.encode() not in path.read_bytes(), path
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    fs = s3fs(s3_env)
    docs = [DocumentRow(**r) for r in pq.read_table("docs/out/documents", filesystem=fs).drop_columns(
        ["ingest_date"]).to_pylist()]
    pages = [PageRow(**r) for r in pq.read_table("docs/out/pages", filesystem=fs).drop_columns(
        ["ingest_date"]).to_pylist()]
    by_uri = {d.source_uri: d for d in docs}
    assert len(docs) == 6 and len(by_uri) == 6
    assert by_uri["s3://docs/in/corrupt.pdf"].status == "error"
    odd = by_uri[f"s3://docs/{ODD_KEY}"]
    assert odd.status == "ok" and odd.page_count == 1 and odd.media_type == "image/jpeg"
    assert sum(d.status == "ok" for d in docs) == 5 and len(pages) == 9
    assert {p.source_uri for p in pages} <= set(by_uri)
    [run_file] = fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector("docs/out/_runs"))
    manifest = fs.open_input_file(run_file.path).read().decode()
    assert json.loads(manifest)["documents"]["total"] == 6
    assert json.loads(manifest)["config"]["storage"]["secret_access_key"] == "**********"
    assert_no_secret(manifest, proc.stdout, proc.stderr)
    # no temporary objects: on S3 each Parquet file is written straight to its final key
    names = [i.path for i in fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector("docs/out", recursive=True))]
    assert not [n for n in names if "/_tmp-" in n or ".probe-" in n]

    # docpipe report reads the run from S3, renders its pages afresh from S3, and writes the site to S3.
    proc = run_cli("report", "s3://docs/out", "--output", "s3://docs/site", env=s3_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 (ok 5, error 1); 6 with a full view, 9 page images" in proc.stdout
    site = [i.path for i in fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector("docs/site", recursive=True))]
    assert sum(n.endswith(".jpg") for n in site) == 9 and "docs/site/index.html" in site
    index = fs.open_input_file("docs/site/index.html").read().decode()
    assert '<td data-count="documents.total">6</td>' in index
    assert_no_secret(index, proc.stdout, proc.stderr)


def test_manifest_input_from_s3_to_local_output(docs_bucket, s3, s3_env, tmp_path, local_job):
    listing = f"s3://docs/in/receipt.png\ns3://docs/{ODD_KEY}\ns3://docs/in/missing.pdf\n"
    s3.put_object(Bucket="docs", Key="lists/today.txt", Body=listing.encode())
    proc = run_cli("run", "--manifest", "s3://docs/lists/today.txt", "--output", tmp_path / "out",
                   "--model", "tiny-random", "--max-new-tokens", "2", "--no-progress",
                   "--config", local_job, env=s3_env)  # reading S3 through Ray: test_run_from_s3_to_s3
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = {r["source_uri"]: r for r in pq.read_table(tmp_path / "out" / "documents").to_pylist()}
    assert docs.keys() == {"s3://docs/in/receipt.png", f"s3://docs/{ODD_KEY}", "s3://docs/in/missing.pdf"}
    assert docs["s3://docs/in/missing.pdf"]["status"] == "error"
    assert docs["s3://docs/in/missing.pdf"]["error_type"] == "read_error"
    assert docs["s3://docs/in/receipt.png"]["status"] == "ok"
    assert_no_secret(proc.stdout, proc.stderr, *(p.read_text() for p in (tmp_path / "out" / "_runs").glob("*.json")))


def test_a_large_prefix_is_listed_and_filtered(s3, s3_env, monkeypatch):
    """Keys over four ListObjectsV2 pages (1,000 keys a page): every page is read and filtered."""
    s3.create_bucket(Bucket="many")
    keys = [f"batch-{i // 1000:02d}/doc-{i:05d}.pdf" for i in range(3_500)] + [f"img/p{i}.png" for i in range(50)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket="many", Key=k, Body=b"x"), keys))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(k, s3_env[k])
    storage = StorageOptions(endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    everything = list_inputs(["s3://many/"], storage=storage)
    assert len(everything.refs) == 3_550 and all(r.size_bytes == 1 for r in everything.refs)
    assert sorted(r.source_uri for r in everything.refs) == sorted(f"s3://many/{k}" for k in keys)
    pdfs = list_inputs(["s3://many"], include=["*.pdf"], exclude=["batch-03/*"], storage=storage)
    assert len(pdfs.refs) == 3_000 and pdfs.filtered_out == 550
    pngs = list_inputs(["s3://many/img/*.png"], storage=storage)
    assert [r.source_uri for r in pngs.refs][:2] == ["s3://many/img/p0.png", "s3://many/img/p1.png"]
    assert len(pngs.refs) == 50
    deep = list_inputs(["s3://many/**/doc-0000?.pdf"], storage=storage)
    assert len(deep.refs) == 10


def test_missing_bucket_fails_fast(s3_env, sample_docs, tmp_path):
    proc = run_cli("run", "s3://no-such-bucket/in", "--output", tmp_path / "out", "--model", "tiny-random", env=s3_env)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("docpipe: error: cannot list s3://no-such-bucket/in") and "does not exist" in line
    proc = run_cli("run", sample_docs / "receipt.png", "--output", "s3://no-such-bucket/out", "--model",
                   "tiny-random", env=s3_env)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    # in docpipe's words: no advice about an S3FileSystem option (allow_bucket_creation) docpipe has no flag for
    assert line == "docpipe: error: cannot write to output s3://no-such-bucket/out: bucket 'no-such-bucket' does not exist"


def test_a_run_into_s3_writes_no_folder_objects(s3, s3_env, tmp_path, monkeypatch):
    """Object stores have no folders: a run writes its files and manifest and no 0-byte "folder/" markers (which
    other tools list as empty files)."""
    import pymupdf

    from docpipe.config import RunConfig
    from docpipe.execute.run import run

    s3.create_bucket(Bucket="markers")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(k, s3_env[k])
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "x")
    doc.save(tmp_path / "blank-ish.pdf")
    (tmp_path / "empty.pdf").write_bytes(b"")
    result = run(RunConfig(inputs=[str(tmp_path)], output="s3://markers/out", executor="local",
                           storage={"endpoint_url": s3_env["AWS_ENDPOINT_URL"]}, model={"name": "tiny-random"},
                           render={"document_timeout_s": None, "page_timeout_s": None}))
    assert result.manifest.documents["total"] == 2
    objects = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket="markers")["Contents"]}
    assert f"out/_runs/{result.manifest.run_id}.json" in objects and len(objects) == 3  # 2 tables + the manifest
    assert not [k for k, size in objects.items() if k.endswith("/") or size == 0], objects


def test_wrong_credentials_fail_fast_without_the_secret(s3_auth_server, s3_env, tmp_path):
    env = {**s3_env, "AWS_ENDPOINT_URL": s3_auth_server}
    proc = run_cli("run", "s3://docs/in", "--output", tmp_path / "out", "--model", "tiny-random", env=env)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("docpipe: error: cannot list s3://docs/in")
    assert "ACCESS_DENIED" in line or "INVALID_ACCESS_KEY_ID" in line
    assert "check the credentials" in line
    assert_no_secret(proc.stdout, proc.stderr)


def test_redaction_and_settings_from_the_environment(monkeypatch):
    from docpipe.errors import describe
    from docpipe.storage import register_secrets, s3_settings

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio.local:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://other:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    settings = s3_settings(StorageOptions())
    assert (settings["scheme"], settings["endpoint_override"], settings["region"]) == ("http", "minio.local:9000",
                                                                                        "eu-west-3")
    storage = StorageOptions(secret_access_key="explicit-secret-value")
    register_secrets(storage)
    assert "explicit-secret-value" not in describe(OSError("signature for explicit-secret-value failed"))
    assert "explicit-secret-value" not in json.dumps(storage.model_dump(mode="json"))
    with pytest.raises(InputError):
        list_inputs(["s3://bucket/x"], storage=StorageOptions(endpoint_url="http://127.0.0.1:9", max_attempts=1,
                                                              connect_timeout_s=1))


def test_listing_reads_no_object_body_and_the_storage_flags_reach_the_requests(docs_bucket, s3_env, tmp_path,
                                                                                  monkeypatch):
    """Every request passes through a recording proxy: listing is ListObjectsV2 (and HEAD), never a GET of an
    object; --endpoint-url sends the requests there, --region signs for that region, --anonymous signs nothing."""
    from urllib.parse import urlsplit

    from docpipe.cli import build_parser, config_from_args
    from tests.faulty_proxy import FaultyProxy

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, s3_env[k])
    with FaultyProxy(s3_env["AWS_ENDPOINT_URL"], faulty_requests=0) as proxy:
        def listed(*flags):
            args = build_parser().parse_args(["run", "s3://docs/in", "--output", str(tmp_path), "--endpoint-url",
                                              proxy.url, *flags])
            proxy.requests.clear()
            return list_inputs(args.inputs, storage=config_from_args(args, args.inputs, args.output).storage).refs

        refs = listed("--region", "eu-west-3")
        assert len(refs) == 6 and proxy.requests
        for method, path, auth in proxy.requests:
            # a GET is a ListObjectsV2 of the bucket, never an object; a HEAD returns no body
            assert (method, urlsplit(path).path) in (("GET", "/docs"), ("GET", "/docs/"), ("HEAD", urlsplit(path).path))
            assert method == "HEAD" or "list-type=2" in urlsplit(path).query, path
            assert auth and "/eu-west-3/s3/aws4_request" in auth  # signed for the region given
        assert any(method == "GET" for method, _, _ in proxy.requests)
        assert listed("--anonymous") and all(auth is None for _, _, auth in proxy.requests)
