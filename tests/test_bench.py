"""docpipe bench is a benchmark, not a test: this only checks that it runs and reports every figure.
No assertion here is about speed."""

import json

from tests.conftest import run_cli

KEYS = {
    "render_pages_per_s_per_core", "bare_render_pages_per_s_per_core", "object_store_bytes_per_page",
    "pipeline_pages_per_s", "baseline_pages_per_s", "model_output_tokens_per_s", "peak_rss_bytes",
    "gpu_peak_memory_bytes", "device", "pages", "isolated_render_pages_per_s", "model_page_fraction",
    "routed_render_pages_per_s_per_core", "text_layer_cpu_s_per_page",
}


def test_bench_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--pages", "6", "--output-tokens", "2", "--json", out, "--workdir", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert KEYS <= figures.keys()
    assert figures["pages"] == 6 and figures["device"].startswith("cpu")
    assert figures["gpu_peak_memory_bytes"] is None  # no GPU here
    assert 0 < figures["object_store_bytes_per_page"] <= 2.5e6  # compacted pages, image splitting on
    assert figures["longest_edge"] == 1960
    for key in KEYS - {"device", "pages", "gpu_peak_memory_bytes", "model_page_fraction"}:
        assert figures[key] > 0, key
    assert figures["model_page_fraction"] == 0.0  # the corpus is born-digital: every page takes its text layer
    assert "pipeline / baseline" in proc.stdout


def test_random_idefics2_8b_has_the_real_architecture():
    import torch

    from pipeline.tiny import build_random_model

    model, processor = build_random_model("idefics2-8b", "meta", torch.bfloat16, "sdpa")
    params = sum(p.numel() for p in model.parameters())
    assert 8.3e9 < params < 8.5e9  # idefics2-8b: 8.4 B parameters
    assert model.config.vision_config.image_size == 980 and model.config.perceiver_config.resampler_n_latents == 64
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert processor.image_processor.do_image_splitting
