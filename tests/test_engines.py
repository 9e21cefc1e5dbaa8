"""The engines: which one an actor runs and why, a failing page in the continuous engine, pages held in
flight, and the engine bench (length mix, useful decode fraction, no Ray needed)."""

import dataclasses
import json
import re

import pyarrow.parquet as pq
import pymupdf
import pytest

from docpipe.config import ModelOptions, RenderOptions
from docpipe.render.document import expand_document
from docpipe.model.engine import choose_engine
from docpipe.errors import ModelLoadError
from docpipe.model.load import stop_and_pad_ids
from docpipe.ocr import OcrStage
from tests.conftest import run_cli


def _pages(*paths):
    return [r for p in paths for r in expand_document(str(p), RenderOptions(), 1960) if r["kind"] == "page"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda(), reason="needs a machine without CUDA (the engine's start must fail for real); on a GPU "
                                    "tests/gpu/test_gpu.py checks that auto runs the continuous engine there")
def test_auto_on_a_device_where_the_continuous_engine_cannot_start_runs_generate_and_says_why(tiny_model):
    """auto never gambles a run: here the engine's start fails for real (its feature bank asks for CUDA memory
    on a machine without CUDA), the actor runs generate, and the record carries the reason."""
    gpu_claimed = dataclasses.replace(tiny_model, device="cuda")
    stop_ids, pad_id = stop_and_pad_ids(tiny_model)
    choice = choose_engine(gpu_claimed, ModelOptions(name="tiny-random", engine="auto"), stop_ids, pad_id)
    assert choice.engine.name == "generate"
    assert choice.record["engine"] == "generate" and choice.record["requested"] == "auto"
    assert re.match(r"fallback: could not start: .*(NVIDIA|CUDA)", choice.record["reason"])
    # asked for explicitly, it is an error that names the reason and the way out
    with pytest.raises(ModelLoadError, match=r"continuous engine cannot serve .*(NVIDIA|CUDA).*--engine generate"):
        choose_engine(gpu_claimed, ModelOptions(name="tiny-random", engine="continuous"), stop_ids, pad_id)
    with pytest.raises(ModelLoadError, match="static_cache and compile are generate options"):
        choose_engine(tiny_model, ModelOptions(name="tiny-random", engine="continuous", static_cache=True),
                      stop_ids, pad_id)


def test_a_failing_page_in_the_continuous_engine_gets_its_error_row_and_its_neighbours_keep_their_text(
        tiny_model, sample_docs):
    pages = _pages(sample_docs / "report.pdf", sample_docs / "receipt.png", sample_docs / "scan.jpg")
    opts = ModelOptions(name="tiny-random", max_new_tokens=8)
    alone = {(r["source_uri"], r["page_number"]): r["text"]
             for r in OcrStage(opts.model_copy(update={"engine": "generate", "batch_size": 1}), loaded=tiny_model)(
                 [dict(p) for p in pages])}

    class EncodingFailsOnTheReceipt(OcrStage):
        """The vision encoding of any batch holding the receipt fails, as a CUDA out-of-memory error would."""

        def prepare_inputs(self, batch):
            if any(r["source_uri"].endswith("receipt.png") for r in batch):
                raise RuntimeError("CUDA out of memory (simulated)")
            return super().prepare_inputs(batch)

    stage = EncodingFailsOnTheReceipt(opts.model_copy(update={"engine": "continuous", "batch_size": 5}),
                                      loaded=tiny_model)
    engine = stage.engine
    submitted = []
    original = engine._submit

    def queue_fails_on_the_second_page(*args):  # a page the engine can't take, after its batch was encoded
        submitted.append(1)
        if len(submitted) == 2:
            raise RuntimeError("cannot queue (simulated)")
        return original(*args)

    engine._submit = queue_fails_on_the_second_page
    try:
        out = stage([dict(p) for p in pages])
    finally:
        engine.close()
    status = {(r["source_uri"], r["page_number"]): r for r in out}
    errors = {k: r["error_message"] for k, r in status.items() if r["status"] == "error"}
    assert len(out) == 5 and len(errors) == 2
    assert errors.pop((str(sample_docs / "receipt.png"), 1)).endswith("CUDA out of memory (simulated)")
    [message] = errors.values()
    assert message.endswith("cannot queue (simulated)")
    for key, row in status.items():
        if row["status"] == "ok":
            assert row["text"] == alone[key], key
    # the bank's rows all came back: nothing leaks when pages fail
    assert engine.pages_in_flight == 0 and engine._free == [range(0, engine.bank_rows)]


@pytest.mark.ray
def test_a_long_run_on_the_continuous_engine_holds_a_bounded_number_of_pages(tmp_path):
    """64 pages in 8 documents, one actor taking two calls at once: every page comes back, the actor took a
    second call while the first was still decoding, and it never held more than calls_in_flight x rows_per_call
    pages (its feature bank's size), whatever the run's size (here 4 banks' worth)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for d in range(8):
        doc = pymupdf.open()
        for n in range(8):
            doc.new_page(width=200, height=260).insert_text((20, 40 + n * 18), f"doc {d} page {n + 1} " * 2)
        doc.save(inputs / f"d{d:02d}.pdf")
    out = tmp_path / "out"
    proc = run_cli("run", inputs, "--output", out, "--model", "tiny-random", "--engine", "continuous",
                   "--batch-size", "2", "--calls-in-flight", "2", "--num-actors", "1", "--max-new-tokens", "2",
                   "--no-image-splitting", "--longest-edge", "200", "--no-progress", "--text-layer", "never")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = pq.read_table(out / "pages").to_pylist()
    assert len(pages) == 64 and {p["status"] for p in pages} == {"ok"}
    assert sorted((p["source_uri"], p["page_number"]) for p in pages) == sorted(
        (str(inputs / f"d{d:02d}.pdf"), n) for d in range(8) for n in range(1, 9))
    [manifest] = (out / "_runs").glob("*.json")
    [engine] = json.loads(manifest.read_text())["engines"]
    assert engine["engine"] == "continuous" and engine["peak_calls_in_flight"] == 2
    assert 1 <= engine["peak_pages_in_flight"] <= 2 * 2 * 4  # calls_in_flight x batch_size x sort_window


ENGINE_ROWS = ["generate, default batch", "generate, batch 64", "continuous"]


def test_bench_engines_measures_the_waste_of_static_batches_on_the_length_mix(tmp_path):
    from docpipe.tools.bench import length_mix

    out = tmp_path / "engines.json"
    rows = [arg for label in ENGINE_ROWS for arg in ("--engine-row", label)]
    proc = run_cli("bench", "--engines", "--pages", "12", "--output-tokens", "16", "--median-tokens", "8",
                   "--batch-size", "4", "--no-image-splitting", *rows, "--json", out, "--workdir", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    lengths = length_mix(12, 8, 16)
    # one image a page is rendered at one crop's edge (980 px), not at the split page's (1960)
    assert report["image_splitting"] is False and "pages at 980 px, each one image" in proc.stdout
    assert report["length_mix"] == {"distribution": "lognormal", "median": 8, "spread": 0.9, "cap": 16, "seed": 0,
                                    "tokens": sum(lengths)}
    assert len(set(lengths)) >= 5 and max(lengths) <= 16
    assert [r["engine"] for r in report["engines"]] == ENGINE_ROWS
    first, big, continuous = report["engines"]
    for row in (first, big, continuous):  # every page stopped at its own length, whichever engine decoded it
        assert row["status"] == "ok" and row["tokens_kept"] == sum(lengths)
        assert row["pages_per_s"] > 0 and row["output_tokens_per_s"] > 0
        assert row["useful_decode_fraction"] == row["tokens_kept"] / row["decode_positions"]
    # dtype auto: bfloat16 on a CUDA GPU that has it (float16 on one that has not), float32 on a CPU
    if _cuda():
        import torch

        expected_dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        expected_dtype = "float32"
    assert first["vs_first_row"] == 1.0 and first["dtype"] == expected_dtype
    assert (first["engine_ran"], first["batch_size"]) == ("generate", 4)
    assert (big["engine_ran"], big["batch_size"]) == ("generate", 64)
    assert continuous["engine_ran"] == "continuous"
    # a static batch decodes until its longest page is done; the continuous engine only what is kept
    assert continuous["useful_decode_fraction"] >= 0.95
    assert big["useful_decode_fraction"] < first["useful_decode_fraction"] < continuous["useful_decode_fraction"]
    # a batch of 12 pages decodes 12 positions a step until the longest page ends
    assert big["decode_positions"] == 12 * max(lengths)


def test_bench_engines_refuses_an_unknown_row(tmp_path):
    proc = run_cli("bench", "--engines", "--engine-row", "warp drive", "--workdir", tmp_path / "w")
    assert proc.returncode == 2 and "no engine row 'warp drive'; the rows are: 'generate, default batch'" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_the_engine_bench_runs_every_row_where_ray_and_pymupdf_are_not_installed(tmp_path):
    """An offline GPU host (docs/engines.md) may have torch and transformers but no Ray and no PyMuPDF: the engine
    bench must run without them, and without the other packages of ours a run needs and the bench does not.
    Without PyMuPDF it draws its pages with Pillow. Every row runs, or says why not."""
    from docpipe.tools.bench import ENGINES
    from tests.conftest import REPO

    blocked = tmp_path / "blocked"
    for name in ("ray", "pymupdf", "fitz", "pyiceberg", "xgrammar", "peft", "rapidfuzz", "pypdfium2", "s3fs", "duckdb"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    out = tmp_path / "engines.json"
    proc = run_cli("bench", "--engines", "--pages", "2", "--output-tokens", "2", "--median-tokens", "1",
                   "--no-image-splitting", "--json", out, "--workdir", tmp_path / "w",
                   env={"PYTHONPATH": f"{blocked}:{REPO}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "w" / "corpus-png").glob("*.png"))) == 2  # drawn, not rendered
    rows = json.loads(out.read_text())["engines"]
    assert [r["engine"] for r in rows] == [label for label, _ in ENGINES]
    by_name = {r["engine"]: r for r in rows}
    assert by_name["generate, dtype bfloat16"]["dtype"] == "bfloat16"
    assert by_name["generate, attention eager"]["attention"] == "eager"
    assert by_name["generate, attention flash_attention_2"]["status"].startswith("not run: flash-attn needs CUDA")
    # what any CPU runs with the base install; bitsandbytes and torch.compile (a C compiler) may say why not
    must_run = ENGINE_ROWS + ["generate, dtype float32", "generate, dtype bfloat16", "generate, dtype float16",
                              "generate, attention eager", "generate, attention sdpa", "generate, static KV cache"]
    assert {name: by_name[name]["status"] for name in must_run} == dict.fromkeys(must_run, "ok")
    for row in rows:  # each option ran, or says why not: none is silently left out
        assert row["status"] == "ok" or row["status"].startswith(("not run: ", "failed: ")), row
        assert row["engine"] in proc.stdout


def _equal_pages(result, run=None):
    run = run or result
    assert set(result["generate"]) == {f"page{i}.png" for i in range(5)}
    assert {row[0] for row in result["generate"].values()} == {"ok"}
    assert {row[3] for row in result["generate"].values()} == {"stop", "length"}  # both ways a page ends
    assert run["record"]["engine"] == "continuous"
    assert run["continuous"] == result["generate"]
    assert run["forward_ordered"] is True  # the loop's forwards wait for their input copies (CUDA; a no-op here)


VARLEN_PAGED = "reference (sdpa per sequence, CPU), paged"


def _equal_varlen(result):
    """torch's varlen path, its CPU reference in the paged form (block tables from the read indices, the cache
    written by the attention: what the pinned torch runs on a GPU): generate's text, output_tokens, finish_reason."""
    run = result["runs"]["varlen"]
    _equal_pages(result, run)
    assert run["record"]["attention"] == VARLEN_PAGED
    assert f"attention {VARLEN_PAGED} (requested)" in run["record"]["reason"]
    assert run["shell_attention_after"] == "sdpa"  # the shell's own attention back once its loop stopped


def test_the_continuous_engine_gives_each_page_what_generate_gives_it_alone_at_the_pinned_transformers(tiny_model):
    """torch's varlen path in its paged form (block tables) and in its gathered form (transformers' gathered copy of
    the cache, what torch 2.10-2.11 run), each against generate. (Every other test here runs transformers' packed
    sdpa: auto on a CPU.)"""
    from tests.engine_equality import compare

    result = compare(tiny_model, attentions=("varlen", "varlen-gathered"))
    _equal_varlen(result)
    gathered = result["runs"]["varlen-gathered"]
    assert gathered["record"]["attention"] == "reference (sdpa per sequence, CPU), gathered"
    _equal_pages(result, gathered)


def test_the_continuous_engine_gives_each_page_what_generate_gives_it_alone_at_the_transformers_floor(tmp_path):
    """The same check under the lowest transformers pyproject.toml admits, installed by make test (make floor) in
    .venv-floor; its image features and continuous-batching options differ from the pin's."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    floor = re.search(r'"transformers>=([0-9.]+)', (REPO / "pyproject.toml").read_text()).group(1)
    target = REPO / ".venv-floor"
    if not (target / f".installed-{floor}").exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"transformers {floor} is not installed in {target}: make floor")
        pytest.skip(f"transformers {floor} not installed in {target} (make floor)")
    proc = subprocess.run([sys.executable, "-m", "tests.engine_equality"], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env={**os.environ, "PYTHONPATH": f"{target}:{REPO}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["transformers"] == floor or result["transformers"] == f"{floor}.0"
    _equal_varlen(result)  # 5.17 hands the attention the cache itself: the varlen path writes and reads it there
    _equal_pages(result, result["runs"]["sdpa"])
    assert result["runs"]["sdpa"]["record"]["attention"] == "paged|sdpa"  # 5.17 renames it


def _run_local(docs, out, engine, **model):
    from docpipe.config import RunConfig
    from docpipe.execute.run import run

    result = run(RunConfig(inputs=[str(docs)], output=str(out), executor="local", progress=False,
                           model=ModelOptions(name="tiny-random", engine=engine, max_new_tokens=8, **model)))
    pages = {(r["source_uri"], r["page_number"]): r for r in pq.read_table(out / "pages").to_pylist()}
    [manifest] = (out / "_runs").glob("*.json")
    assert manifest.stem == result.manifest.run_id
    manifest = json.loads(manifest.read_text())
    return pages, manifest["engines"], manifest["counters"]


def test_auto_falls_back_to_generate_when_the_continuous_loop_fails_its_start_check(sample_docs, tmp_path,
                                                                                    monkeypatch):
    """Every forward pass of the loop fails (DOCPIPE_FAULT_CB=start, as a CUDA-graph or kernel failure would, which
    transformers' warm-up only logs): the start check finds it, auto runs generate and the manifest says why."""
    monkeypatch.setenv("DOCPIPE_FAULT_CB", "start")
    pages, engines, _ = _run_local(sample_docs, tmp_path / "out", "auto")
    [engine] = engines
    assert engine["engine"] == "generate" and engine["requested"] == "auto"
    assert engine["reason"].startswith("fallback: could not start: RuntimeError: the continuous-batching loop "
                                       "failed its start check")
    assert "injected loop failure (DOCPIPE_FAULT_CB=start)" in engine["reason"]
    assert len(pages) == 9 and {p["status"] for p in pages.values()} == {"ok"}


@pytest.mark.parametrize("fault", ["die-after:3", "hang-after:3"])
def test_pages_in_flight_when_the_continuous_loop_dies_mid_run_are_decoded_by_generate(sample_docs, tmp_path,
                                                                                        monkeypatch, fault):
    """The loop dies (its forward raises: transformers ends it) or hangs (a forward never returns: no step for
    engine_stall_timeout_s) after three forward passes, with pages in flight: those pages are retried on generate,
    which runs the rest of the run, and every page gets the text generate gives it."""
    expected, _, _ = _run_local(sample_docs, tmp_path / "generate", "generate")
    monkeypatch.setenv("DOCPIPE_FAULT_CB", fault)
    pages, engines, counters = _run_local(sample_docs, tmp_path / "out", "continuous", engine_stall_timeout_s=3)
    [engine] = engines
    assert engine["engine"] == "generate" and engine["requested"] == "continuous"
    assert engine["reason"].startswith("fallback mid-run: ")
    assert ("injected loop failure" if fault.startswith("die") else "gave no result in 3 s") in engine["reason"]
    assert pages.keys() == expected.keys() and len(pages) == 9
    for key, row in pages.items():
        assert (row["status"], row["text"], row["output_tokens"]) == (
            "ok", expected[key]["text"], expected[key]["output_tokens"]), key
    assert counters["model_retries"] >= 1  # pages the loop took and died with, decoded again by generate


def test_two_calls_in_flight_when_the_continuous_loop_dies_get_every_page_and_no_exception(tiny_model, sample_docs,
                                                                                          monkeypatch):
    """Two calls of one actor (threads) in flight; the loop dies at its third forward pass of the run. The second
    call sees it first and swaps the stage to generate while the first call is between two of its batches (made
    certain by events): the first call still submits and waits on the engine it started with, its pages are lost
    to that engine and retried on generate, no exception escapes, and every page gets generate's text."""
    import threading

    pages = _pages(sample_docs / "report.pdf", sample_docs / "receipt.png", sample_docs / "scan.jpg")
    opts = ModelOptions(name="tiny-random", max_new_tokens=8, batch_size=1)
    alone = {(r["source_uri"], r["page_number"]): (r["status"], r["text"], r["output_tokens"])
             for r in OcrStage(opts.model_copy(update={"engine": "generate"}), loaded=tiny_model)(
                 [dict(p) for p in pages])}
    # no page of the second call ends within the two forward passes the loop makes: they all die with it
    assert min(alone[(p["source_uri"], p["page_number"])][2] for p in pages[2:]) > 2
    monkeypatch.setenv("DOCPIPE_FAULT_CB", "die-after:2")  # the third forward pass of the run raises
    first_in, swapped = threading.Event(), threading.Event()

    class Orchestrated(OcrStage):
        calls = 0

        def prepare_inputs(self, batch):
            if threading.current_thread().name == "first" and not swapped.is_set():
                Orchestrated.calls += 1
                if Orchestrated.calls == 1:
                    first_in.set()  # its first batch goes to the continuous engine; now the second call starts
                else:
                    swapped.wait(timeout=120)  # a safety net: the second call's fallback sets it
            return super().prepare_inputs(batch)

        def _fall_back(self, dead):
            super()._fall_back(dead)
            swapped.set()

    stage = Orchestrated(opts.model_copy(update={"engine": "continuous"}), loaded=tiny_model)
    continuous = stage.engine
    assert continuous.name == "continuous"
    results, raised = {}, {}

    def call(name, records):
        try:
            results[name] = stage([dict(p) for p in records])
        except BaseException as exc:  # noqa: BLE001 -- what escaped the stage is the finding
            raised[name] = exc

    first = threading.Thread(target=call, args=("first", pages[:2]), name="first")
    second = threading.Thread(target=call, args=("second", pages[2:]), name="second")
    first.start()
    assert first_in.wait(timeout=120)
    second.start()
    for t in (first, second):
        t.join(timeout=300)  # a safety net
        assert not t.is_alive()
    assert swapped.is_set() and Orchestrated.calls == 2  # the first call's second batch came after the swap
    assert raised == {}
    out = results["first"] + results["second"]
    assert {(r["source_uri"], r["page_number"]): (r["status"], r["text"], r["output_tokens"]) for r in out} == alone
    # the first call's second page went in after the loop died: lost to it, and decoded again
    assert any(r["retries"] >= 1 for r in results["first"])
    assert stage.engine.name == "generate" and stage.engine_record["reason"].startswith("fallback mid-run: ")
    assert stage.engine_record["peak_pages_in_flight"] == continuous.peak_pages_in_flight >= 1  # kept after it
    # the dead engine let go of its memory: manager, feature bank and result thread
    assert continuous.manager is None and continuous.bank is None and continuous.lm.model.embed_tokens.bank is None
    assert not continuous._dispatcher.is_alive()


def test_a_page_queued_as_the_loop_dies_is_lost_to_it_and_its_bank_rows_come_back_once(tiny_model, sample_docs):
    """The loop dies between the engine's dead check and the manager's refusal of the page (add_request returns
    None): the page is lost to the loop (retried on generate, not an error row) and its rows are given back once."""
    pages = _pages(sample_docs / "receipt.png")
    opts = ModelOptions(name="tiny-random", max_new_tokens=8)
    [alone] = OcrStage(opts.model_copy(update={"engine": "generate"}), loaded=tiny_model)([dict(p) for p in pages])
    stage = OcrStage(opts.model_copy(update={"engine": "continuous"}), loaded=tiny_model)
    engine = stage.engine

    def dies_meanwhile(*args, **kwargs):
        engine._die("the loop died (simulated)")  # fails the pages in flight, this one included
        return None  # what a stopping manager answers

    engine.manager.add_request = dies_meanwhile
    [page] = stage([dict(p) for p in pages])
    assert (page["status"], page["text"], page["retries"]) == ("ok", alone["text"], 1)
    assert engine.pages_in_flight == 0 and engine._free == [range(0, engine.bank_rows)]
    assert stage.engine.name == "generate" and stage.engine_record["peak_pages_in_flight"] == 1


def test_the_decoding_shell_drops_a_sliding_window_no_request_reaches_and_decodes_the_same_tokens(tiny_model,
                                                                                                  monkeypatch):
    """Like Mistral-7B's, the tiny text model has a 4096-token window, which no page reaches: the shell decodes
    without it (transformers' full-attention paged cache) and gives the tokens it gives with it."""
    import docpipe.model.continuous as ec
    from tests.engine_equality import compare

    assert tiny_model.model.config.text_config.sliding_window == 4096
    assert ec.shell_sliding_window(4096, 356, 1024) is None
    assert ec.shell_sliding_window(4096, 356, 4000) == 4096 and ec.shell_sliding_window(None, 9, 9) is None
    without = compare(tiny_model)
    monkeypatch.setattr(ec, "shell_sliding_window", lambda window, prompt, new: window)
    kept = compare(tiny_model)
    assert (without["shell_sliding_window"], kept["shell_sliding_window"]) == (None, 4096)
    assert tiny_model.model.config.text_config.sliding_window == 4096  # the shell's config is its own copy
    assert without["continuous"] == kept["continuous"] == without["generate"]


def test_gpu_sizing_for_idefics2_8b_holds_over_128_pages_on_an_80_gb_card_and_bounds_the_encoding_peak(monkeypatch):
    """pipeline/model/sizing.py with idefics2-8b's configuration (pipeline/model/assets) in bf16, after loading its
    16.8 GB of weights; numbers given, so it runs on a CPU. The plan is then handed to transformers' own paged cache
    (built on the meta device, the GPU's memory faked): its footprint (KV cache, attention mask, activation peaks),
    the feature bank and the encoding must fit in the memory left after loading."""
    import json
    import types

    import torch
    from transformers import ContinuousBatchingConfig, Idefics2Config
    from transformers.generation.continuous_batching import cache as paged
    from transformers.generation.continuous_batching.initialization import resolve_continuous_batching_config

    from docpipe.model import sizing
    from tests.conftest import REPO

    spec = json.loads((REPO / "pipeline/model/assets/idefics2-8b.json").read_text())
    config = Idefics2Config(**{k: v for k, v in spec.items() if not k.startswith("_") and k != "model_type"})
    assert sizing.kv_bytes_per_token(config.text_config, 2) == 128 * 2**10  # 2 x 32 layers x 8 heads x 128 x bf16
    kv = sizing.kv_bytes_per_page(config.text_config, 356, 1024, 2)  # 5 crops' prompt, the default token cap
    assert kv == 7 * 256 * 128 * 2**10  # 6 blocks of 256 tokens, and one for block edges
    encode = sizing.encode_bytes_per_page(config, 5, 2)
    assert 2.0e9 < encode < 2.7e9  # 5 crops of 4900 patches through the 14336-wide connector
    bank = 320 * 4096 * 2
    batch_tokens = sizing.batch_tokens(356)
    assert batch_tokens == 256 + 4 * 356  # every page decoding and four prefills a step, under transformers' 8192
    text = config.text_config  # the decoding shell's: sdpa, no sliding window (no page reaches it)
    text._attn_implementation, text.sliding_window = "sdpa", None
    seen = {}
    footprint = paged.PagedAttentionMemoryHandler.compute_memory_footprint

    def spy(handler, max_batch_tokens, sectors):
        seen.update(bytes=footprint(handler, max_batch_tokens, sectors),
                    mask=handler.attention_mask_bytes(max_batch_tokens, sectors))
        return seen["bytes"]

    monkeypatch.setattr(paged.PagedAttentionMemoryHandler, "compute_memory_footprint", spy)
    GiB = 2**30
    for total_gib, weights, batch, least in [(80, 16.8e9, 4, 128), (141, 16.8e9, 4, 256), (80, 16.8e9, 16, 128)]:
        total = total_gib * GiB
        free = int(total - weights - 1 * GiB)  # the CUDA context and allocator slack
        plan = sizing.plan_pages(free, total, kv, encode, bank, batch_size=batch, batch_tokens=batch_tokens,
                                 cache_tokens_per_page=7 * 256, masks=1)
        assert least <= plan.pages_in_flight <= sizing.DEFAULT_MAX_PAGES, (total_gib, plan)  # 80 GB: 193 (198 unmasked)
        usable = free - sizing.RESERVE_FRACTION * total - sizing.RESERVE_BYTES
        assert 1 <= plan.encode_pages <= batch and plan.encode_pages * encode <= sizing.ENCODE_SHARE * usable
        # transformers, as the engine calls it on that GPU (the bank already allocated), sizes what it was told
        in_use = total - free + plan.pages_in_flight * bank
        monkeypatch.setattr(paged, "get_device_and_memory_breakdown",
                            lambda: (torch.device("cuda"), total, in_use, in_use))
        cb = ContinuousBatchingConfig(allow_block_sharing=False, num_blocks=7 * plan.pages_in_flight,
                                      max_requests_per_batch=plan.pages_in_flight, max_batch_tokens=plan.batch_tokens,
                                      use_cuda_graph=False, default_compile_level=0, page_size=256,
                                      max_memory_percent=plan.memory_fraction())
        cb = resolve_continuous_batching_config(text, cb, None, has_logit_processors=False, device=torch.device("cuda"))
        cache = paged.PagedAttentionCache(text, cb, device="meta", distributed_helper=types.SimpleNamespace(tp_size=1),
                                          dtype=torch.bfloat16)  # raises MemoryError past max_memory_percent
        assert (cache.max_batch_tokens, cache.num_blocks) == (batch_tokens, 7 * plan.pages_in_flight)
        assert seen["mask"] == plan.mask_bytes  # the plan counts transformers' mask to the byte
        # everything the engine holds at once fits in the memory left after loading, with room to spare
        assert seen["bytes"] + plan.pages_in_flight * bank + plan.encode_pages * encode <= free - 1 * GiB, total_gib
    assert sizing.plan_pages(int(80 * GiB - 16.8e9), 80 * GiB, kv, encode, bank, 4, max_pages=64).pages_in_flight == 64
    starved = sizing.plan_pages(1 * GiB, 24 * GiB, kv, encode, bank, 4)  # nothing left: one page at a time
    assert (starved.pages_in_flight, starved.encode_pages) == (1, 1)


def test_random_idefics2_8b_is_created_in_its_dtype_without_a_float32_copy(monkeypatch):
    """Created in bf16 where it lives: a float32 build cast afterwards took 33.6 GB (50 GB at its peak) on a GPU.
    No cast may run (Module.to is forbidden here), every parameter is bf16, the default dtype is restored."""
    import torch

    from docpipe.model.tiny import build_random_model

    def no_cast(*args, **kwargs):
        raise AssertionError("the random model was cast after it was built")

    monkeypatch.setattr(torch.nn.Module, "to", no_cast)
    model, _ = build_random_model("idefics2-8b", "meta", torch.bfloat16, "sdpa")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


def test_bitsandbytes_leaves_the_vision_tower_and_connector_unquantised():
    from docpipe.model.load import quantization_config

    for bits in ("8bit", "4bit"):
        config = quantization_config(ModelOptions(quantization=bits), "bfloat16")
        assert {"vision_model", "connector", "lm_head"} <= set(config.llm_int8_skip_modules), bits


def test_auto_attention_picks_flash_attention_3_then_2_on_a_gpu_where_importable(monkeypatch):
    import importlib.util

    from docpipe.model.load import pick_attention

    installed = set()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in installed else (None if name.startswith("flash_attn")
                                                                             else real(name, *a)))
    auto = ModelOptions()
    assert pick_attention(auto, "cuda") == "sdpa"
    installed.add("flash_attn")
    assert pick_attention(auto, "cuda") == "flash_attention_2"
    installed.add("flash_attn_interface")
    assert pick_attention(auto, "cuda") == "flash_attention_3"
    assert pick_attention(auto, "cpu") == "sdpa"
    assert pick_attention(ModelOptions(attention="sdpa"), "cuda") == "sdpa"


def test_on_a_gpu_the_engine_is_sized_from_the_memory_left_after_loading(tiny_model, monkeypatch):
    """The glue from a loaded model to pipeline/model/sizing.py, with the device's free memory given: the tiny model's
    own KV and encoding costs per page, capped by max_pages_in_flight, encoding at most batch_size pages a call."""
    import torch

    from docpipe.model import sizing
    from docpipe.model.continuous import _plan_on_gpu

    GiB = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (60 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 20 * GiB)  # its weights, as loading left them
    opts = ModelOptions(name="tiny-random", max_new_tokens=64, batch_size=4)
    plan = _plan_on_gpu(tiny_model, opts, prompt_tokens=400, rows_per_page=320, splitting=True, path="varlen")
    text = tiny_model.model.config.text_config
    assert plan.kv_bytes_per_page == sizing.kv_bytes_per_page(text, 400, 64, 4)  # float32 on this CPU
    assert plan.encode_bytes_per_page == sizing.encode_bytes_per_page(tiny_model.model.config, 5, 4)
    assert (plan.pages_in_flight, plan.encode_pages) == (sizing.DEFAULT_MAX_PAGES, 4)  # a tiny model: the cap
    # sdpa and no sliding window the pages reach: one attention mask of 256 + 4 x 400 tokens by the cache's tokens
    assert plan.batch_tokens == 256 + 4 * 400
    assert plan.mask_bytes == (256 + 4 * 400) * (256 * 3 * 256 + 256 + 4 * 400) * 4  # 3 blocks of 256 per page
    capped = _plan_on_gpu(tiny_model, opts.model_copy(update={"max_pages_in_flight": 48}), 400, 320, True)
    assert capped.pages_in_flight == 48 and "48 pages in flight" in capped.describe()
    assert capped.batch_tokens == 48 + 4 * 400 and f"{48 + 4 * 400} tokens a step" in capped.describe()
    # transformers' packed sdpa: capped where its step stops paying for more pages; flash-attn: no mask at all
    sdpa = _plan_on_gpu(tiny_model, opts, 400, 320, True, path="sdpa")
    assert sdpa.pages_in_flight == sizing.SDPA_MAX_PAGES and sdpa.batch_tokens == sizing.SDPA_MAX_PAGES + 4 * 400
    assert _plan_on_gpu(tiny_model, opts, 400, 320, True, path="flash").mask_bytes == 0
    # two actors sharing the GPU: each plans with its half less the 20 GiB it holds, not with all 60 GiB free
    shared = _plan_on_gpu(tiny_model, opts.model_copy(update={"gpu_memory_share": 0.5}), 400, 320, True, path="varlen")
    assert shared.free_bytes == 20 * GiB and plan.free_bytes == 60 * GiB


def test_the_decode_step_cost_model_caps_sdpa_where_it_peaks_and_ranks_the_attention_paths():
    """pipeline/model/sizing.py's roofline for idefics2-8b's text model (numbers given): packed sdpa gives the most
    tokens per second at SDPA_MAX_PAGES pages in flight and fewer beyond; the paged kernels read the cache once,
    the gathered one three times, sdpa's expansion more."""
    import json

    from transformers import Idefics2Config

    from docpipe.model import sizing
    from tests.conftest import REPO

    spec = json.loads((REPO / "pipeline/model/assets/idefics2-8b.json").read_text())
    text = Idefics2Config(**{k: v for k, v in spec.items() if not k.startswith("_") and k != "model_type"}).text_config
    weights = int(14.2e9)
    shape = sizing.DecodeShape.of(text, 2, weights)
    assert sizing.best_pages("sdpa", 656, shape) == sizing.SDPA_MAX_PAGES == 64
    rate = {b: b / sizing.step_roofline_s("sdpa", b, 656, shape) for b in (64, 128, 256)}
    assert rate[64] > rate[128] > rate[256]
    assert sizing.best_pages("varlen_paged", 656, shape) == 256  # the memory plan decides
    kv = 128 * 2**10 * 128 * 656  # 128 requests x 656 tokens x 128 KiB a token
    moved = {p: sizing.decode_step_cost(p, 128, 656, shape)[0] for p in sizing.PATHS}
    assert moved["varlen_paged"] == moved["flash"] == weights + kv
    assert moved["varlen_gathered"] == weights + 3 * kv
    assert moved["sdpa"] > 3 * moved["varlen_paged"]
    assert 0.19e9 < moved["varlen_paged"] / 128 < 0.2e9 and 0.36e9 < moved["varlen_gathered"] / 128 < 0.38e9


def test_the_varlen_reference_and_its_block_table_give_sdpa_s_causal_attention_per_sequence():
    """pipeline/model/attention.py on its own, with random tensors: three sequences (a prefill of 5 tokens, two
    decodes over 300 and 40 tokens of context), grouped-query heads, the cache scattered over pages of 256 in an
    arbitrary order: the block table built from the read indices, the paged and gathered reference and a plain
    causal sdpa per sequence agree."""
    import torch

    from docpipe.model import attention

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, page = 4, 2, 8, 256
    lengths_q, lengths_k = [5, 1, 1], [5, 300, 40]
    pool_pages = [[3], [0, 5], [2]]  # request i's pages, in order
    k_pool, v_pool = (torch.randn(6, page, kv_heads, dim, generator=g) for _ in range(2))
    read = torch.tensor([p * page + j % page for pages, n in zip(pool_pages, lengths_k) for j in range(n)
                         for p in [pages[j // page]]])
    cu_k = torch.tensor([0, 5, 305, 345], dtype=torch.int32)
    cu_q = torch.tensor([0, 5, 6, 7], dtype=torch.int32)
    table = attention.block_table(read, cu_k, max(lengths_k), page)
    assert table.tolist() == [[3, 0], [0, 5], [2, 0]] and table.dtype == torch.int32
    q = torch.randn(sum(lengths_q), heads, dim, generator=g)
    flat_k, flat_v = k_pool.reshape(-1, kv_heads, dim)[read], v_pool.reshape(-1, kv_heads, dim)[read]
    gathered = attention.reference(q, flat_k, flat_v, cu_q, cu_k, 5, 300, 0.5)
    paged = attention.reference(q, k_pool, v_pool, cu_q, cu_k, 5, 300, 0.5, table, cu_k[1:] - cu_k[:-1])
    torch.testing.assert_close(paged, gathered)
    for i in range(3):  # each sequence alone: its queries are its last tokens, causal over its keys
        qi = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        ki, vi = (x[cu_k[i] : cu_k[i + 1]].repeat_interleave(2, dim=1).transpose(0, 1) for x in (flat_k, flat_v))
        n, m = ki.shape[1], qi.shape[1]
        mask = torch.ones(m, n, dtype=torch.bool).tril(diagonal=n - m)
        want = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=0.5)
        torch.testing.assert_close(gathered[cu_q[i] : cu_q[i + 1]], want.transpose(0, 1))


def test_the_continuous_engine_picks_torch_s_varlen_kernels_on_cuda_without_flash_attn_and_says_why_not_elsewhere():
    import torch

    from docpipe.model import attention

    kernel, why = attention.choose("cuda", torch.bfloat16, "auto", "sdpa", None, 128)
    assert (kernel.name, kernel.paged, why) == ("torch varlen_attn, paged", True, "auto on cuda without flash-attn")
    assert {"block_table", "seqused_k", "enable_gqa"} <= attention.varlen_signature()  # the pinned torch's
    assert attention.choose("cuda", torch.bfloat16, "auto", "flash_attention_2", None, 128) == (
        None, "flash_attention_2 is loaded")
    assert attention.choose("cuda", torch.float32, "auto", "sdpa", None, 128)[1] == (
        "no varlen: float32 (FlashAttention takes float16 and bfloat16)")
    assert attention.choose("cuda", torch.bfloat16, "auto", "sdpa", 4096, 128)[1].startswith(
        "no varlen: a sliding window (4096)")
    assert attention.choose("cpu", torch.float32, "auto", "sdpa", None, 128) == (None, "auto on cpu")
    assert attention.choose("cpu", torch.float32, "sdpa", "sdpa", None, 128) == (None, "requested")
    with pytest.raises(ValueError, match="engine_attention varlen cannot run here: head dim 300"):
        attention.choose("cpu", torch.float32, "varlen", "sdpa", None, 300)


_VARLEN_BASE = {"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "return_aux"}
# varlen_attn's parameters as each torch release documents them (docs.pytorch.org/docs/<release>/nn.attention.varlen)
_VARLEN_SIGNATURES = {
    "2.10": _VARLEN_BASE | {"is_causal"},
    "2.11": _VARLEN_BASE | {"scale", "window_size"},  # an offline GPU host's torch may well be this one
    "2.12": _VARLEN_BASE | {"scale", "window_size", "enable_gqa", "seqused_k", "block_table", "num_splits"},
}


def test_the_varlen_kernel_follows_the_torch_release_gathered_before_2_12_paged_from_it_sdpa_without_one(
        monkeypatch):
    """The pinned torch has the paged form; a GPU host's torch may be older. Each release's documented signature
    picks its form, and the chosen kernel's call fits the op's schema with grouped-query shapes (meta tensors: no
    GPU needed, shapes and arguments checked by the op itself)."""
    import types

    import torch

    from docpipe.model import attention

    meta = {"device": "meta", "dtype": torch.bfloat16}
    q, cu = torch.empty(7, 4, 64, **meta), torch.empty(3, device="meta", dtype=torch.int32)
    gathered = ("torch _flash_attention_forward, gathered", False,
                "auto on cuda without flash-attn (this torch's varlen_attn has no paged form: gathered)")
    paged = ("torch varlen_attn, paged", True, "auto on cuda without flash-attn")
    for release, want in (("2.9", gathered), ("2.10", gathered), ("2.11", gathered), ("2.12", paged)):
        monkeypatch.setattr(attention, "varlen_signature", lambda r=release: set(_VARLEN_SIGNATURES.get(r, ())))
        kernel, why = attention.choose("cuda", torch.bfloat16, "auto", "sdpa", None, 64)
        assert (kernel.name, kernel.paged, why) == want, release
        if kernel.paged:  # 2 requests' pages of 256 tokens through a block table, 2 key heads for 4 query heads
            kv, extra = torch.empty(3, 256, 2, 64, **meta), (torch.empty(2, 2, device="meta", dtype=torch.int32),
                                                             torch.empty(2, device="meta", dtype=torch.int32))
        else:  # the gathered context, packed
            kv, extra = torch.empty(9, 2, 64, **meta), ()
        assert kernel.run(q, kv, kv, cu, cu, 4, 300, 0.125, *extra).shape == (7, 4, 64), release
        assert attention.choose("cuda", torch.bfloat16, "varlen", "sdpa", None, 64)[0].name == want[0]

    # a torch with neither varlen_attn nor the op beneath it: transformers' sdpa, and why; varlen asked for: an error
    monkeypatch.setattr(attention, "varlen_signature", set)
    monkeypatch.setattr(torch.ops, "aten", types.SimpleNamespace())
    assert attention.choose("cuda", torch.bfloat16, "auto", "sdpa", None, 64) == (
        None, f"no varlen: torch {torch.__version__} has no FlashAttention kernel")
    with pytest.raises(ValueError, match="varlen cannot run here: torch .* has no FlashAttention kernel"):
        attention.choose("cuda", torch.bfloat16, "varlen", "sdpa", None, 64)


def _more_drawn_pages(n: int) -> list[dict]:
    """``n`` distinct pages drawn with Pillow, of several shapes (engine_equality's five, then more)."""
    import io

    from PIL import Image, ImageDraw

    from tests.engine_equality import drawn_pages

    pages = drawn_pages()
    for i in range(len(pages), n):
        size = [(360, 480), (520, 400), (300, 620)][i % 3]
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).text((20, 20 + 9 * (i % 5)), f"sheet {i}: invoice {100 + 7 * i} due " * 2, fill="black")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pages.append({"kind": "page", "status": "ok", "image": buf.getvalue(), "image_codec": "png",
                      "width": size[0], "height": size[1], "source_uri": f"page{i}.png", "page_number": 1})
    return pages[:n]


def _texts(rows):
    return {r["source_uri"]: (r["status"], r.get("text"), r.get("output_tokens"), r.get("finish_reason")) for r in rows}


def test_the_continuous_engine_gives_each_page_what_generate_gives_it_when_the_bank_rows_are_reused(tiny_model):
    """A feature bank of 2 pages (batch 2, one batch a call, one call in flight) for 8 pages: every row is written
    four times. A row read before its new page's features are written, or a virtual id pointing at another page's
    rows, changes that page's text."""
    pages = _more_drawn_pages(8)
    opts = ModelOptions(name="tiny-random", max_new_tokens=12, batch_size=2, sort_window=1, calls_in_flight=1,
                        max_pages_in_flight=2)  # the bank on a GPU too
    alone = _texts(OcrStage(opts.model_copy(update={"engine": "generate", "batch_size": 1}), loaded=tiny_model)(
        [dict(p) for p in pages]))
    assert len({v[1] for v in alone.values()}) >= 4  # the pages' texts differ: a swapped row would show
    stage = OcrStage(opts.model_copy(update={"engine": "continuous"}), loaded=tiny_model)
    engine = stage.engine
    taken = []
    take = engine._take_rows

    def counted(n):
        rows = take(n)
        taken.append(rows)
        return rows

    engine._take_rows = counted
    try:
        out = stage([dict(p) for p in pages])
    finally:
        engine.close()
    assert engine.capacity_pages == 2 and len(taken) == len(pages) == 4 * engine.capacity_pages
    per_page = engine.rows_per_page
    assert {(r.start, r.stop) for r in taken} == {(0, per_page), (per_page, 2 * per_page)}  # the same two, reused
    assert stage.engine_record["engine"] == "continuous"
    assert len(out) == len(pages) and _texts(out) == alone
    assert {row[0] for row in alone.values()} == {"ok"}


def test_a_bank_smaller_than_the_batch_holds_exactly_its_pages_and_loses_none(tiny_model):
    """The bank holds 2 pages and a batch brings 5: the engine holds 2 at once (the first forward pass waits until
    both are in, so the peak is the schedule's, not a race's), the third waits for a row, and every page comes
    back once, with the text generate gives it alone."""
    import threading

    from docpipe.model.continuous import ContinuousEngine
    from tests.engine_equality import drawn_pages

    pages = drawn_pages()
    opts = ModelOptions(name="tiny-random", max_new_tokens=10, batch_size=5, engine="continuous",
                        max_pages_in_flight=2)  # on a GPU, the plan's cap; on a CPU, the size given below
    alone = _texts(OcrStage(opts.model_copy(update={"engine": "generate", "batch_size": 1}), loaded=tiny_model)(
        [dict(p) for p in pages]))
    stage = OcrStage(opts, loaded=tiny_model)
    stage.engine.close()  # its bank: on a CPU batch_size x sort_window x calls_in_flight pages (40)
    engine = stage.engine = ContinuousEngine(tiny_model, opts, stage.stop_ids, stage.pad_id, 2)
    both_in = threading.Event()
    taken = []
    take = engine._take_rows

    def counted(n):
        rows = take(n)
        taken.append((rows, engine.pages_in_flight))
        if engine.pages_in_flight == engine.capacity_pages:
            both_in.set()
        return rows

    def first_forward_waits(module, args):
        both_in.wait(timeout=120)  # a safety net: the second page's rows set it

    engine._take_rows = counted
    engine.lm.register_forward_pre_hook(first_forward_waits)
    try:
        out = stage([dict(p) for p in pages])
    finally:
        engine.close()
    assert engine.capacity_pages == 2 and engine.bank_rows == 2 * engine.rows_per_page
    assert engine.peak_pages_in_flight == 2  # the bank's size, reached: and never more
    assert [held for _, held in taken][:2] == [1, 2] and max(held for _, held in taken) == 2
    assert len(taken) == 5 and all(rows.stop <= engine.bank_rows for rows, _ in taken)
    assert sorted(r["source_uri"] for r in out) == sorted(p["source_uri"] for p in pages)  # none dropped, none twice
    assert _texts(out) == alone and {row[0] for row in alone.values()} == {"ok"}


def test_a_page_that_fails_in_its_batch_is_retried_alone_and_the_manifest_counts_the_retried_pages(tmp_path):
    """A 2-page TIFF whose second frame is 2000 x 1 pixels, a real input the image processor fails on (it divides
    by a side that rounds to zero): the batch of both pages fails, each page is retried alone, the thin one gets its
    error row and its batch-mate the text it gets in a batch of its own. counters.model_retries counts the two
    retried pages; a run of single-page batches retries nothing."""
    import io

    import numpy as np
    from PIL import Image

    from docpipe.config import RunConfig
    from docpipe.execute.run import run
    from tests.engine_equality import drawn_pages

    inputs = tmp_path / "in"
    inputs.mkdir()
    page = Image.open(io.BytesIO(drawn_pages()[0]["image"])).convert("RGB")
    thin = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1, 2000, 3), dtype=np.uint8))
    page.save(inputs / "two.tiff", save_all=True, append_images=[thin])

    def run_with(batch_size):
        out = tmp_path / f"out-{batch_size}"
        result = run(RunConfig(inputs=[str(inputs)], output=str(out), executor="local", progress=False,
                               route={"text_layer": "never", "skip_blank": False},  # the thin frame reaches the model
                               model=ModelOptions(name="tiny-random", engine="generate", batch_size=batch_size,
                                                  max_new_tokens=6, processor_device="cpu")))  # the same on a GPU
        [manifest] = (out / "_runs").glob("*.json")
        assert manifest.stem == result.manifest.run_id
        rows = {r["page_number"]: r for r in pq.read_table(out / "pages").to_pylist()}
        return rows, json.loads(manifest.read_text())

    together, manifest = run_with(2)
    alone, manifest_alone = run_with(1)
    assert manifest["counters"]["model_retries"] == 2 and manifest_alone["counters"]["model_retries"] == 0
    assert manifest["pages"] == manifest_alone["pages"] == {"ok": 1, "error": 1, "total": 2}
    for rows in (together, alone):
        assert (rows[2]["status"], rows[2]["error_type"]) == ("error", "model_error")
        assert rows[2]["error_message"].startswith("ZeroDivisionError")
        assert rows[1]["status"] == "ok" and rows[1]["text_source"] == "model"
    assert (together[1]["text"], together[1]["output_tokens"]) == (alone[1]["text"], alone[1]["output_tokens"])


def test_generate_encodes_a_batch_in_bounded_chunks_with_the_same_features(tiny_model):
    """generate's vision encoding runs encode_pages pages a call, as the continuous engine's does (a batch of 64 at
    once needed ~120 GB of activations for idefics2-8b): the pooled rows are those of one call over the batch."""
    import torch

    from docpipe.model.engine import GenerateEngine, bounded_encoding
    from docpipe.model.load import stop_and_pad_ids

    stage = OcrStage(ModelOptions(name="tiny-random", engine="generate", batch_size=2), loaded=tiny_model)
    records = [{"_pixels": torch.randint(0, 255, (3, 56 + 14 * i, 70), dtype=torch.uint8)} for i in range(2)]  # small
    inputs = stage.prepare_inputs(records)
    inner = tiny_model.model.model
    calls = []
    original = type(inner).get_image_features

    def counted(self, pixel_values, *args, **kwargs):
        calls.append(pixel_values.shape[0])
        return original(self, pixel_values, *args, **kwargs)

    def flat(pooled):
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled]) if isinstance(pooled, (list, tuple)) \
            else pooled.reshape(-1, pooled.shape[-1])

    with torch.inference_mode():
        whole = inner.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output
        type(inner).get_image_features = counted
        try:
            with bounded_encoding(tiny_model.model, 1):
                chunked = inner.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"])
            assert calls == [1, 1] and "get_image_features" not in vars(inner)  # put back on the way out
            assert chunked.last_hidden_state is None  # the first chunk's alone would be wrong
            torch.testing.assert_close(flat(chunked.pooler_output), flat(whole))
            stop_ids, pad_id = stop_and_pad_ids(tiny_model)
            engine = GenerateEngine(tiny_model, stage.opts, stop_ids, pad_id)
            assert engine.encode_pages == 2  # batch_size on a CPU
            engine.encode_pages, calls[:] = 1, []
            assert [g.finish_reason for g in engine.generate(inputs, [1, 1])] == ["length", "length"]
            assert calls == [1, 1]  # generate's own encoding, a page a call
        finally:
            type(inner).get_image_features = original
