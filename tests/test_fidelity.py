"""Tests that can catch a wrong page: the tiny model is image-sensitive (pipeline/model/tiny.py), so a page that
gets another page's text, an image that never reaches the model, or rows shuffled inside a batch show up as
a changed text."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from docpipe.config import ModelOptions, RenderOptions, RunConfig
from docpipe.render.document import expand_document
from docpipe.ocr import OcrStage
from tests.conftest import run_cli

MAX_NEW_TOKENS = 16  # long enough that some pages stop on their own and others reach the cap


def _drawn_page(path, size, lines, fmt="PNG"):
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        draw.text((20, 20 + 36 * k), line, fill="black")
    img.save(path, format=fmt)


@pytest.fixture(scope="module")
def corpus(sample_docs, tmp_path_factory):
    """The demo documents (9 pages: 3- and 2-page PDFs, a JPEG scan, a receipt, a 2-page TIFF), an animated
    GIF of two different frames, and pages of four other shapes: 15 distinct pages."""
    folder = tmp_path_factory.mktemp("fidelity")
    for f in sample_docs.iterdir():
        if f.name != "corrupt.pdf":
            (folder / f.name).write_bytes(f.read_bytes())
    frames = []
    for n in range(2):
        frame = Image.new("RGB", (640, 480), "white")
        ImageDraw.Draw(frame).text((30, 40 + 200 * n), f"Frame {n + 1}: " + "totals and balances " * 3, fill="black")
        frames.append(frame.convert("P"))
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    for i, size in enumerate([(800, 1100), (1200, 600), (500, 500), (1000, 1400)]):
        _drawn_page(folder / f"shape{i}.png", size, [f"Line {k} of page {i}, " * 3 for k in range(10)])
    return folder


def _page_records(path):
    return [r for r in expand_document(str(path), RenderOptions(), 1960) if r["kind"] == "page"]


def _key(row):
    return row["source_uri"].rsplit("/", 1)[-1], row["page_number"]


@pytest.fixture(scope="module")
def alone(corpus, tmp_path_factory, docpipe_cache):
    """Every page's result with nothing beside it: the local executor, one page per generate() call."""
    from docpipe.execute.run import run

    out = tmp_path_factory.mktemp("alone")
    run(RunConfig(inputs=[str(corpus)], output=str(out), executor="local", route={"text_layer": "never"},
                  model=ModelOptions(name="tiny-random", batch_size=1, max_new_tokens=MAX_NEW_TOKENS)))
    return {_key(r): r for r in pq.read_table(out / "pages").to_pylist()}


def test_distinct_pages_get_distinct_texts_and_both_finish_reasons(alone):
    assert len(alone) == 15 and {r["status"] for r in alone.values()} == {"ok"}
    texts = [r["text"] for r in alone.values()]
    assert all(texts) and len(set(texts)) >= 14
    reasons = [r["finish_reason"] for r in alone.values()]
    assert {"stop", "length"} <= set(reasons)
    for r in alone.values():  # cut at the cap, or ended by the model's own stop token (counted)
        assert r["finish_reason"] == "stop" or r["output_tokens"] == MAX_NEW_TOKENS


def test_pages_of_one_document_and_frames_of_one_file_differ(alone):
    for name, count in [("report.pdf", 3), ("minutes.pdf", 2), ("fax.tiff", 2), ("animated.gif", 2)]:
        texts = [alone[(name, n)]["text"] for n in range(1, count + 1)]
        assert len(set(texts)) == count, (name, texts)


def test_a_batched_sorted_two_actor_ray_run_gives_each_page_its_own_text(alone, corpus, tmp_path, local_job):
    """Pages of different shapes are sorted and padded together, four to a call: every page must come back with
    exactly the text, length and finish reason it gets alone. On the local executor (sorting and padding are the
    actor's stages); pages spread over two Ray actors and back through Ray Data are ray_run's, below."""
    out = tmp_path / "out"
    proc = run_cli("run", corpus, "--output", out, "--model", "tiny-random", "--batch-size", "4", "--num-actors", "2",
                   "--max-new-tokens", MAX_NEW_TOKENS, "--no-progress", "--text-layer", "never",
                   "--config", local_job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batched = {_key(r): r for r in pq.read_table(out / "pages").to_pylist()}
    assert batched.keys() == alone.keys()
    for key, row in batched.items():
        got = (row["text"], row["output_tokens"], row["finish_reason"])
        assert got == (alone[key]["text"], alone[key]["output_tokens"], alone[key]["finish_reason"]), key


@pytest.mark.ray
def test_the_continuous_engine_gives_every_page_what_generate_gives_it_alone(alone, corpus, tmp_path):
    """15 pages of 8 shapes, some stopping on their own after different lengths, others at the cap, through the
    continuous engine (feature bank, transformers' continuous batching) on two actors with two calls in flight
    each: text, output_tokens and finish_reason must equal generate's, batch 1.

    The Ray tier's contract run: the output contract through Ray Data (schemas, partitions, one row per
    document) is checked here, for the local-executor runs of test_run, test_route and the batched test above."""
    import json

    from docpipe.schemas import CONTRACT_VERSION, DOCUMENTS_SCHEMA, PAGES_SCHEMA

    out = tmp_path / "out"
    proc = run_cli("run", corpus, "--output", out, "--model", "tiny-random", "--engine", "continuous",
                   "--batch-size", "4", "--calls-in-flight", "2", "--num-actors", "2",
                   "--max-new-tokens", MAX_NEW_TOKENS, "--no-progress", "--text-layer", "never")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # not a terminal: stderr holds docpipe's own lines only (Ray's progress bars, its warnings and the actors'
    # model-loading bars go to Ray's logs), one of them saying where Ray's lines went
    lines = proc.stderr.splitlines()
    assert [ln for ln in lines if not ln.startswith("docpipe: ")] == [], proc.stderr[-3000:]
    [ray_log] = [Path(ln.removeprefix("docpipe: Ray's own log lines go to ")) for ln in lines
                 if ln.startswith("docpipe: Ray's own log lines go to ")]
    assert ray_log.is_file()
    continuous = {_key(r): r for r in pq.read_table(out / "pages").to_pylist()}
    assert continuous.keys() == alone.keys()
    lengths = {r["output_tokens"] for r in alone.values() if r["finish_reason"] == "stop"}
    assert len(lengths) >= 3  # pages really stop at different lengths
    for key, row in continuous.items():
        got = (row["text"], row["output_tokens"], row["finish_reason"])
        assert got == (alone[key]["text"], alone[key]["output_tokens"], alone[key]["finish_reason"]), key
    [manifest] = (out / "_runs").glob("*.json")
    engines = json.loads(manifest.read_text())["engines"]
    # every actor that took pages ran the continuous engine (with 15 pages, one actor may have taken them all)
    assert 1 <= len(engines) <= 2 and {e["engine"] for e in engines} == {"continuous"}
    # the contract, as Ray Data's blocks came back: Hive partitions of the run's day, the schemas, the version
    day = json.loads(manifest.read_text())["started_at"][:10]
    pages_t, docs_t = pq.read_table(out / "pages"), pq.read_table(out / "documents")
    for table in (pages_t, docs_t):
        assert set(table.column("ingest_date").to_pylist()) == {day}
    assert pages_t.drop_columns(["ingest_date"]).schema.remove_metadata() == PAGES_SCHEMA.remove_metadata()
    assert docs_t.drop_columns(["ingest_date"]).schema.remove_metadata() == DOCUMENTS_SCHEMA.remove_metadata()
    files = list(out.rglob("*.parquet"))
    assert files and all(f.parent.name == f"ingest_date={day}" for f in files)
    assert all(pq.read_schema(f).metadata[b"docpipe.contract_version"] == str(CONTRACT_VERSION).encode() for f in files)
    docs = docs_t.to_pylist()
    assert sorted(d["source_uri"] for d in docs) == sorted(str(f) for f in corpus.iterdir())  # one row each
    by_uri = {d["source_uri"]: d for d in docs}
    assert all(d["status"] == "ok" for d in docs)
    for p in pages_t.to_pylist():
        doc = by_uri[p["source_uri"]]
        assert p["doc_id"] == doc["doc_id"] and p["page_count"] == doc["page_count"]


def test_batched_extraction_gives_each_document_what_it_gets_alone(corpus, tiny_model):
    """Several documents' chunks in one generate() call, one grammar matcher per row, prompts of different
    lengths (1- to 3-page chunks) padded together: each result equals that chunk's extraction on its own."""
    from docpipe.config import ExtractOptions
    from docpipe.extract.stage import ExtractStage
    from docpipe.ocr import decode_page

    stage = ExtractStage(ModelOptions(name="tiny-random", batch_size=4),
                         ExtractOptions(schema="key_values", max_new_tokens=48, retry_temperature=0), tiny_model)
    chunks = [r for name in ("report.pdf", "receipt.png", "scan.jpg", "minutes.pdf")
              for r in expand_document(str(corpus / name), RenderOptions(), 1960, ocr=False, chunk_pages=8)
              if r["kind"] == "chunk"]
    assert sorted(len(c["images"]) for c in chunks) == [1, 1, 2, 3]
    batched = stage([dict(c) for c in chunks])
    for chunk, got in zip(chunks, batched):
        pixels = [decode_page(*args) for args in zip(chunk["images"], chunk["image_codecs"], chunk["widths"],
                                                       chunk["heights"])]
        alone = stage.extract_one(pixels, seed=0)
        assert got["status"] == "ok"
        for field in ("raw_output", "extraction", "valid", "extraction_finish_reason", "output_tokens"):
            assert got[field] == alone[field], (chunk["source_uri"], field)
    assert len({r["raw_output"] for r in batched}) == 4


class _FailsOnPage(OcrStage):
    """The real stage, made to fail whenever a batch holds the receipt (as a CUDA out-of-memory error would)."""

    def _generate(self, batch, forced=False):
        if any(r["source_uri"].endswith("receipt.png") for r in batch):
            raise RuntimeError("CUDA out of memory (simulated)")
        super()._generate(batch, forced)


def test_a_batch_retried_in_halves_keeps_each_pages_own_text(alone, corpus, tiny_model):
    pages = [p for name in ("report.pdf", "receipt.png", "scan.jpg") for p in _page_records(corpus / name)]
    stage = _FailsOnPage(ModelOptions(name="tiny-random", batch_size=5, max_new_tokens=MAX_NEW_TOKENS),
                         loaded=tiny_model)
    out = {_key(r): r for r in stage(pages)}
    assert out[("receipt.png", 1)]["status"] == "error"
    survivors = [k for k in out if k != ("receipt.png", 1)]
    assert len(survivors) == 4
    for key in survivors:
        assert out[key]["retries"] >= 1 and out[key]["text"] == alone[key]["text"], key


def test_two_documents_get_different_extractions(corpus, tiny_model):
    from docpipe.config import ExtractOptions
    from docpipe.extract.stage import ExtractStage
    from docpipe.ocr import decode_page

    stage = ExtractStage(ModelOptions(name="tiny-random"), ExtractOptions(schema="key_values", max_new_tokens=48),
                         tiny_model)
    results = {}
    for name in ("receipt.png", "scan.jpg"):
        [page] = _page_records(corpus / name)
        pixels = [decode_page(page["image"], page["image_codec"], page["width"], page["height"])]
        results[name] = stage.extract_one(pixels, seed=0)
    assert results["receipt.png"]["raw_output"] != results["scan.jpg"]["raw_output"]
    assert results["receipt.png"]["extraction"] != results["scan.jpg"]["extraction"]
