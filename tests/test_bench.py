"""docpipe bench is a benchmark, not a test: this only checks that it runs and reports every figure.
No assertion here is about speed."""

import json

import pytest

from tests.conftest import run_cli


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()

KEYS = {
    "render_pages_per_s_per_core", "bare_render_pages_per_s_per_core", "object_store_bytes_per_page",
    "pipeline_pages_per_s", "baseline_pages_per_s", "model_output_tokens_per_s", "peak_rss_bytes",
    "gpu_peak_memory_bytes", "device", "pages", "isolated_render_pages_per_s", "model_page_fraction",
    "routed_render_pages_per_s_per_core", "text_layer_cpu_s_per_page",
}


@pytest.mark.ray
def test_bench_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--pages", "6", "--output-tokens", "2", "--json", out, "--workdir", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert KEYS <= figures.keys()
    cuda = _cuda()
    assert figures["pages"] == 6 and figures["device"].startswith("cuda: " if cuda else "cpu")
    if cuda:  # the pipeline's model actor held its weights on the GPU
        assert figures["gpu_peak_memory_bytes"] > 0
    else:
        assert figures["gpu_peak_memory_bytes"] is None  # no GPU: nothing to measure, and no made-up figure
    assert 0 < figures["object_store_bytes_per_page"] <= 2.5e6  # compacted pages, image splitting on
    assert figures["longest_edge"] == 1960
    for key in KEYS - {"device", "pages", "gpu_peak_memory_bytes", "model_page_fraction"}:
        assert figures[key] > 0, key
    assert figures["model_page_fraction"] == 0.0  # the corpus is born-digital: every page takes its text layer
    assert "pipeline / baseline" in proc.stdout


def test_text_layer_bench_reports_cpu_per_page_three_ways(tmp_path):
    """docpipe bench --text-layer's measure, on a prose page and a statement page of its born-digital mix: each way
    measured on every page, the prose on the fast path and the table on the layout analysis."""
    from docpipe.tools.bench import measure_text_layer
    from docpipe.tools.corpus import TEXT_LAYER_MIX, make_text_layer_corpus

    paths = make_text_layer_corpus(tmp_path, pages=6)
    assert [p.stem for p in paths] == [kind for kind, _ in TEXT_LAYER_MIX]
    figures = measure_text_layer([p for p in paths if p.stem in ("prose", "statement")])
    assert figures["text_layer_pages"] == 3 and figures["layout_page_fraction"] == 1 / 3
    for way in ("bare", "ours", "layout_every_page"):
        for stat in ("median", "p90", "mean"):
            assert figures[f"{way}_cpu_s_{stat}"] > 0, (way, stat)
    kinds = figures["by_kind"]
    assert (kinds["prose"]["pages"], kinds["prose"]["layout_pages"], kinds["statement"]["layout_pages"]) == (2, 0, 1)


def test_text_layer_bench_command_prints_and_writes_the_same_figures(tmp_path):
    """docpipe bench --text-layer end to end: 6 pages asked give 7 (each of the six kinds has a page at least, the
    prose two), the header says 7, and the table printed holds the JSON's own figures."""
    out = tmp_path / "text-layer.json"
    proc = run_cli("bench", "--text-layer", "--pages", "6", "--json", out, "--workdir", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["text_layer_pages"] == 7 == sum(row["pages"] for row in figures["by_kind"].values())
    assert proc.stdout.startswith("bench --text-layer: 7 born-digital pages (prose 35%, ")
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("  ours: rules, and the layout analysis")]
    assert line.split()[-3:] == [f"{figures[f'ours_cpu_s_{stat}']:.3f}" for stat in ("median", "p90", "mean")]
    assert figures["by_kind"]["prose"]["layout_pages"] == 0 and figures["by_kind"]["statement"]["layout_pages"] == 1


def test_random_idefics2_8b_has_the_real_architecture():
    import torch

    from docpipe.model.tiny import build_random_model

    model, processor = build_random_model("idefics2-8b", "meta", torch.bfloat16, "sdpa")
    params = sum(p.numel() for p in model.parameters())
    assert 8.3e9 < params < 8.5e9  # idefics2-8b: 8.4 B parameters
    assert model.config.vision_config.image_size == 980 and model.config.perceiver_config.resampler_n_latents == 64
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert processor.image_processor.do_image_splitting


# What an offline GPU host may lack (and what only runs, reports or the pipeline bench need): importing any of them
# fails there. jinja2 stays: torch and transformers need it. flash_attn is not installed here either (blocked so,
# transformers would find it and then fail to import it), nor psutil (transformers probes it the same way).
NOT_ON_THE_GPU_HOST = ("ray", "pymupdf", "fitz", "pypdfium2", "xgrammar", "peft", "rapidfuzz", "pyiceberg", "s3fs",
                       "duckdb", "matplotlib")


def _gpu_host_path(tmp_path):
    from tests.conftest import REPO

    blocked = tmp_path / "blocked"
    for name in NOT_ON_THE_GPU_HOST:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    return f"{blocked}:{REPO}"


def test_gpu_check_dry_runs_on_a_cpu_without_ray_or_pymupdf(tmp_path):
    """The command an offline GPU host runs (docs/engines.md), dry-run here on tiny-random: every section reports
    real figures; the continuous engine's step per attention path beside its roofline, the plan as numbers."""
    import torch
    import transformers

    out = tmp_path / "gpu-check.json"
    proc = run_cli("bench", "--gpu-check", "--json", out, "--workdir", tmp_path / "w",
                   env={"PYTHONPATH": _gpu_host_path(tmp_path)}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU dry run, sizes scaled down" in proc.stdout
    r = json.loads(out.read_text())
    assert r["failed_sections"] == [] and r["cpu_dry_run"] is True and r["model"] == "tiny-random"
    assert r["stall_timeout_s"] == 90
    plan = r["plan"]

    v = r["versions"]
    assert (v["torch"], v["transformers"]) == (torch.__version__, transformers.__version__)
    assert v["device"] == "cpu" and v["cuda"] == torch.version.cuda and v["dtype"] == "float32"
    assert v["attention_paths"] == ["sdpa", "varlen"] and "block_table" in v["varlen_attn_parameters"]

    assert r["ceilings"]["matmul_tflops"] > 0 and r["ceilings"]["copy_gb_per_s"] > 0

    load = r["model_load"]
    assert 0 < load["parameters"] < 10e6 and load["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # 2 layers, 2 kv heads

    sizes = r["encode"]["sizes"]
    assert [s["pages"] for s in sizes] == plan["encode_pages"]
    for s in sizes:
        assert s["crops"] == s["pages"]  # the dry run encodes one crop a page
        assert s["ms_per_page"] > 0 and s["vision_ms_per_page"] > 0 and s["connector_ms_per_page"] > 0

    steps = r["decode_step"]["batches"]
    assert [s["requests"] for s in steps] == plan["decode_requests"]
    for s in steps:
        assert s["wall_ms"] > 0 and s["profiled_cpu_op_ms"] > 0 and s["memory_roofline_ms"] > 0

    paths = r["continuous_step"]["paths"]
    assert set(paths) == {"sdpa", "varlen"}
    assert paths["varlen"]["attention"] == "reference (sdpa per sequence, CPU), paged"
    assert (paths["sdpa"]["cost_path"], paths["varlen"]["cost_path"]) == ("sdpa", "varlen_paged")
    for path in paths.values():
        assert path["plan"]["pages_in_flight"] == 4 and path["plan"]["encode_pages"] >= 1  # batch 2 x 2 calls
        rows = path["sizes"]
        assert [row["requests"] for row in rows] == sorted(set(plan["step_requests"]) | {4})
        assert [row["planned"] for row in rows] == [row["requests"] == 4 for row in rows]
        for row in rows:
            assert row["ms_per_step"] > 0 and row["full_decode_steps"] >= plan["step_tokens"]
            assert 0 < row["prompt_tokens"] <= plan["step_prompt_tokens"] == 128  # a page's prompt, capped on a CPU
            assert 0 < row["mean_decode_batch"] <= row["requests"]
            assert row["tokens_per_s"] == pytest.approx(row["requests"] / row["ms_per_step"] * 1e3)
            assert row["bytes_per_token"] > 0 and row["roofline_ms"] > 0
            assert row["roofline_ratio"] == pytest.approx(row["roofline_ms"] / row["ms_per_step"])
    # the gathered sdpa path moves more bytes per token than the paged varlen one at the same size
    assert paths["sdpa"]["sizes"][-1]["bytes_per_token"] > paths["varlen"]["sizes"][-1]["bytes_per_token"]

    runs = r["agreement"]["runs"]
    assert [(x["dtype"], x["path"]) for x in runs] == [("float32", "sdpa"), ("float32", "varlen")]
    for x in runs:  # float32 on a CPU: the tokens are generate's, no near tie needed
        assert x["agree"] is True and [p["verdict"] for p in x["pages"]] == ["equal"] * plan["agreement_pages"]

    o = r["overlap"]
    assert o["pages"] == o["pages_equal"] == plan["overlap_calls"] * 2 and o["encode_calls"] == plan["overlap_calls"]
    assert o["steps"] > 0

    engines = r["engines"]["engines"]
    for name in ("generate", "continuous"):
        e = engines[name]
        assert e["engine_ran"] == name and e["error_rows"] == 0 and e["retries"] == 0
        assert e["pages_per_s"] > 0 and e["peak_pages_in_flight"] >= 1 and e["peak_memory_gb"] is None
    assert engines["generate"]["pages"] == plan["pages"]
    c = engines["continuous"]
    assert c["pages"] == max(plan["pages"], 2 * 4) and c["planned_pages_in_flight"] == 4
    assert c["ramp_s"] >= 0 and c["tail_s"] >= 0 and c["steps"] > 0 and c["mean_decode_batch"] >= 1
    for name in SECTIONS:
        assert r[name]["status"] == "ok" and r[name]["seconds"] >= 0, name


SECTIONS = ("versions", "ceilings", "model_load", "encode", "decode_step", "continuous_step", "agreement", "overlap",
            "engines")


def test_gpu_check_records_a_failing_section_and_runs_the_next(tmp_path):
    """Four sections fail (injected: the heavier ones, so this run stays short); the others after them still run
    and report, the JSON says which failed and why, and the exit status says so in one line."""
    out = tmp_path / "gpu-check.json"
    faults = ["encode", "continuous_step", "agreement", "overlap"]
    proc = run_cli("bench", "--gpu-check", "--json", out, "--workdir", tmp_path / "w", "--pages", "2",
                   "--output-tokens", "4", "--median-tokens", "2", "--batch-size", "2",
                   env={"PYTHONPATH": _gpu_host_path(tmp_path), "DOCPIPE_FAULT_GPU_CHECK": ",".join(faults)},
                   timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"docpipe: error: gpu-check: section(s) failed: {', '.join(faults)}" in proc.stderr
    r = json.loads(out.read_text())
    assert r["failed_sections"] == faults
    for name in faults:
        assert r[name]["status"] == "failed" and f"fault injected in section '{name}'" in r[name]["error"]
        assert f"[{name}] failed" in proc.stdout
    for name in ("decode_step", "engines"):  # sections after a failed one
        assert r[name]["status"] == "ok", (name, r[name].get("error"))
    assert all(s["wall_ms"] > 0 for s in r["decode_step"]["batches"])
    assert {e: x["error_rows"] for e, x in r["engines"]["engines"].items()} == {"generate": 0, "continuous": 0}
    # the end-to-end section sizes itself without the step section's plan: at least plan.pages
    assert r["engines"]["engines"]["continuous"]["pages"] == 2


def test_gpu_check_judges_a_flip_by_generate_s_margin_within_the_dtype_s_rounding_of_the_top_logit():
    """agreement's judge on synthetic steps: bf16's eps is 2**-7, so at a top logit of 10 the tolerance is
    4 x 2**-7 x 10 = 0.3125. A flip 0.25 below the top is a near tie, 0.5 below is a disagreement; a far negative
    logit elsewhere does not widen the tolerance; a shorter or longer answer disagrees; the same tokens are equal."""
    import torch

    from docpipe.tools.gpu_check import _judge

    def reference(third_step: dict[int, float]) -> dict:
        logits = [torch.zeros(8) for _ in range(4)]
        for step, token in enumerate([5, 3, 7, 2]):
            logits[step][token] = 10.0
        for token, value in third_step.items():
            logits[2][token] = value
        return {"tokens": [5, 3, 7, 2], "logits": logits}

    assert _judge(reference({}), [5, 3, 7, 2], torch.bfloat16) == {"verdict": "equal"}
    assert _judge(reference({6: 9.75}), [5, 3, 6, 2], torch.bfloat16) == {
        "verdict": "near tie", "first_difference": 2, "margin": 0.25, "tolerance": 0.3125, "tokens": [7, 6]}
    assert _judge(reference({6: 9.5}), [5, 3, 6, 1], torch.bfloat16) == {
        "verdict": "disagree", "first_difference": 2, "margin": 0.5, "tolerance": 0.3125, "tokens": [7, 6]}
    assert _judge(reference({6: 9.5, 0: -40.0}), [5, 3, 6], torch.bfloat16) == {
        "verdict": "disagree", "first_difference": 2, "margin": 0.5, "tolerance": 0.3125, "tokens": [7, 6]}
    # float32: eps 2**-23, the same flip of 0.25 is far beyond its rounding
    judged = _judge(reference({6: 9.75}), [5, 3, 6, 2], torch.float32)
    assert (judged["verdict"], judged["margin"], judged["tolerance"]) == ("disagree", 0.25, 4 * 2**-23 * 10)
    # a top logit below 1 in size: the tolerance at 1
    small = {"tokens": [1], "logits": [torch.tensor([-0.5, 0.5, 0.5 - 2**-6])]}
    assert _judge(small, [2], torch.bfloat16) == {
        "verdict": "near tie", "first_difference": 0, "margin": 2**-6, "tolerance": 4 * 2**-7, "tokens": [1, 2]}
    # one answer a prefix of the other (a page cut short, or run past its stop): no margin to judge by
    for tokens, at in (([5, 3, 7], 3), ([5, 3, 7, 2, 2], 4)):
        assert _judge(reference({}), tokens, torch.bfloat16) == {
            "verdict": "disagree", "first_difference": at, "why": f"lengths 4 and {len(tokens)}"}
