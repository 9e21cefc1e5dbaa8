"""``docpipe bench``: measure rendering, transfer and end-to-end throughput side by side, in one run.

A benchmark, not a test: it prints a table and, with --json, writes the figures. Every
figure comes from this run on this machine; compare ratios, not absolute numbers, across
machines.

- render: docpipe's read-and-render stage (open, hash, render, compact, Arrow record), one process
- bare render: a plain PyMuPDF loop over the same pages producing the same compact bytes
- bare raster: the same loop without compaction (raw 8-bit RGB, too big to ship: shown for reference)
- pipeline: ``docpipe run`` through Ray Data, timed from the moment its first model actor is ready (steady
  state, like the baseline); pipeline_wall_pages_per_s counts the whole run, start-up included
- baseline: a plain serial loop in one process, timed after the model has loaded: render to a PIL image,
  processor, generate, page by page
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from docpipe.tools.corpus import LENGTH_SEED, LENGTH_SPREAD, length_mix


class _PeakSampler:
    """Peak resident memory of this process and its descendants (Ray's local processes), and of the GPU."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak_rss, self.peak_gpu = interval, 0, None
        self._stop = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        import psutil

        me = psutil.Process()
        gpu = _gpu_used_bytes
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, total)
            used = gpu()
            if used is not None:
                self.peak_gpu = max(self.peak_gpu or 0, used)
            self._stop.wait(self.interval)


def _gpu_used_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


def _best_rate(fn, pages: int, rounds: int = 2) -> float:
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = max(best, pages / (time.perf_counter() - t0))
    return best


def measure_render(paths: list[Path], opts, longest_edge: int) -> dict[str, float]:
    import pymupdf

    from docpipe.render.document import expand_document

    from docpipe.render.isolated import expand_document_isolated
    from docpipe.records import RENDERED_SCHEMA, to_table
    from docpipe.render.pixels import _zstd, pdf_zoom

    pages = sum(pymupdf.open(p).page_count for p in paths)
    sizes: list[int] = []

    def ours():
        sizes.clear()
        for p in paths:
            for rec in expand_document(str(p), opts, longest_edge):
                table = to_table([rec], RENDERED_SCHEMA)
                if rec["kind"] == "page":
                    sizes.append(table.nbytes)

    def bare(compact: bool):
        codec = _zstd()
        for p in paths:
            doc = pymupdf.open(p)
            for page in doc:
                zoom = pdf_zoom(page.rect.width, page.rect.height, opts, longest_edge)
                pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
                if compact:
                    codec.compress(pix.samples_mv, asbytes=True)

    def isolated():
        # as runs render: in a child process under time limits, records piped back (wall clock, two processes)
        for p in paths:
            for rec in expand_document_isolated(str(p), opts, longest_edge):
                to_table([rec], RENDERED_SCHEMA)

    ours()  # warm-up: fonts and caches
    isolated()  # warm-up: starts the fork server
    return {
        "render_pages_per_s_per_core": _best_rate(ours, pages),
        "isolated_render_pages_per_s": _best_rate(isolated, pages),
        "bare_render_pages_per_s_per_core": _best_rate(lambda: bare(True), pages),
        "bare_raster_pages_per_s_per_core": _best_rate(lambda: bare(False), pages),
        "object_store_bytes_per_page": sum(sizes) / len(sizes),
    }


def measure_routing(paths: list[Path], opts, longest_edge: int) -> dict[str, float]:
    """The render stage with --text-layer auto: the share of pages still sent to the model, and its speed; and
    the CPU the text layer's rules and Markdown take per page on their own (the budget: 0.2 s of one core)."""
    import pymupdf

    from docpipe.config import RouteOptions
    from docpipe.render.document import expand_document
    from docpipe.render.route import pymupdf_text_layer
    from docpipe.render.text_layer import RunningLines

    route = RouteOptions(text_layer="auto")
    sources: list[str | None] = []

    def routed():
        sources.clear()
        for p in paths:
            sources.extend(rec.get("text_source") for rec in expand_document(str(p), opts, longest_edge, route=route)
                           if rec["kind"] == "page" and rec["status"] == "ok")

    routed()  # warm-up
    cpu, pages = time.process_time(), 0
    for p in paths:
        doc = pymupdf.open(p)
        running = RunningLines(doc)
        for page in doc:
            pymupdf_text_layer(page, running).page_text()  # the Markdown is made on demand
            pages += 1
    text_layer_cpu = (time.process_time() - cpu) / pages
    return {"model_page_fraction": sum(s is None for s in sources) / len(sources),
            "routed_render_pages_per_s_per_core": _best_rate(routed, len(sources)),
            "text_layer_cpu_s_per_page": text_layer_cpu}


def measure_text_layer(paths: list[Path]) -> dict[str, Any]:
    """CPU seconds per text-layer page (median and p90), in one run, page by page, three ways: bare PyMuPDF text
    extraction (``page.get_text()``), ours (the text layer's facts and Markdown as the render stage makes them:
    the layout analysis where the rules are unsure), and ours with the layout analysis on every page. The three
    run on the same page one after the other, so a load that comes and goes weighs on each alike."""
    import statistics

    import pymupdf

    from docpipe.render.route import pymupdf_text_layer
    from docpipe.render.text_layer import RunningLines, page_markdown

    def cpu(fn) -> tuple[float, Any]:
        t = time.process_time()
        out = fn()
        return time.process_time() - t, out

    warm = pymupdf.open(paths[0])[0]  # the layout model loads on its first page: not a page's cost
    page_markdown(warm, analysis="layout")
    bare, ours, layout, kinds, analyses = [], [], [], [], []
    for path in paths:
        doc = pymupdf.open(path)
        running, running_layout = RunningLines(doc), RunningLines(doc)
        for page in doc:
            bare.append(cpu(lambda: page.get_text())[0])
            seconds, markdown = cpu(lambda: pymupdf_text_layer(page, running).page_text())
            ours.append(seconds)
            analyses.append(markdown.analysis)
            layout.append(cpu(lambda: (pymupdf_text_layer(page, running_layout),
                                       page_markdown(page, running=running_layout, analysis="layout")))[0])
            kinds.append(path.stem)

    def quantiles(values: list[float]) -> dict[str, float]:
        cuts = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
        return {"median": statistics.median(values), "p90": cuts[8], "mean": statistics.fmean(values)}

    out: dict[str, Any] = {"text_layer_pages": len(ours),
                           "layout_page_fraction": analyses.count("layout") / len(analyses)}
    for name, values in (("bare", bare), ("ours", ours), ("layout_every_page", layout)):
        q = quantiles(values)
        for stat, value in q.items():
            out[f"{name}_cpu_s_{stat}"] = value
    out["by_kind"] = {kind: {"pages": kinds.count(kind), "layout_pages": sum(1 for k, a in zip(kinds, analyses)
                                                                                if k == kind and a == "layout"),
                             "ours_cpu_s_median": statistics.median(v for k, v in zip(kinds, ours) if k == kind)}
                      for kind in dict.fromkeys(kinds)}
    return out


TEXT_LAYER_ROWS = [
    ("bare", "bare PyMuPDF text extraction (page.get_text)"),
    ("ours", "ours: rules, and the layout analysis where unsure"),
    ("layout_every_page", "ours with the layout analysis on every page"),
]


def text_layer_main(args) -> None:
    """docpipe bench --text-layer: the text layer's cost per page on the born-digital mix (corpus.TEXT_LAYER_MIX)."""
    from docpipe.tools.corpus import TEXT_LAYER_MIX, make_text_layer_corpus

    pages = args.pages or 60
    work = Path(args.workdir or tempfile.mkdtemp(prefix="docpipe-bench-"))
    import pymupdf

    paths = make_text_layer_corpus(work / "text-layer", pages=pages)
    made = sum(pymupdf.open(p).page_count for p in paths)  # every kind has a page at least: a few more where few
    mix = ", ".join(f"{kind} {share:.0%}" for kind, share in TEXT_LAYER_MIX)
    print(f"bench --text-layer: {made} born-digital pages ({mix}); {describe_device()}", flush=True)
    results = {"device": describe_device(), **measure_text_layer(paths)}
    print()
    print(f"  {'CPU s per text-layer page':<52} {'median':>8} {'p90':>8} {'mean':>8}")
    for key, label in TEXT_LAYER_ROWS:
        figures = (results[f"{key}_cpu_s_{stat}"] for stat in ("median", "p90", "mean"))
        print(f"  {label:<52} " + " ".join(f"{value:>8.3f}" for value in figures))
    print(f"  pages that took the layout analysis: {results['layout_page_fraction']:.0%} of "
          f"{results['text_layer_pages']}")
    for kind, row in results["by_kind"].items():
        print(f"    {kind:<12} {row['pages']:>3} pages, {row['layout_pages']:>3} with layout, ours median "
              f"{row['ours_cpu_s_median']:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


def measure_baseline(paths: list[Path], model_opts, longest_edge: int) -> dict[str, float]:
    """Render, processor, generate: one page at a time, the way a first script would do it."""
    import pymupdf
    import torch
    from PIL import Image

    from docpipe.model.load import load_model
    from docpipe.render.pixels import pdf_zoom
    from docpipe.config import RenderOptions

    m = load_model(model_opts)
    opts = RenderOptions()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": model_opts.prompt}]}]
    prompt = m.processor.apply_chat_template(messages, add_generation_prompt=True)
    pages = tokens = 0
    t0 = time.perf_counter()  # steady state: model loading excluded, as for the pipeline's figure
    for p in paths:
        for page in pymupdf.open(p):
            zoom = pdf_zoom(page.rect.width, page.rect.height, opts, longest_edge)
            pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
            img = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
            inputs = m.processor(text=[prompt], images=[[img]], return_tensors="pt").to(m.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(m.dtype)
            with torch.inference_mode():
                out = m.model.generate(**inputs, max_new_tokens=model_opts.max_new_tokens,
                                       min_new_tokens=model_opts.min_new_tokens or None, do_sample=False)
            tokens += out.shape[1] - inputs["input_ids"].shape[1]
            pages += 1
    wall = time.perf_counter() - t0
    del m
    return {"baseline_pages_per_s": pages / wall, "baseline_output_tokens": tokens}


def describe_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {os.cpu_count()} cores, {cpu}"


def run_bench(args) -> dict[str, Any]:
    from docpipe.tools.corpus import make_bench_corpus
    from docpipe.config import TINY_MODEL, ModelOptions, RenderOptions, RunConfig
    from docpipe.model.load import pick_device, render_edge_for, resolve_checkpoint
    from docpipe.execute.cluster import init_ray, shutdown_ray
    from docpipe.execute.run import run

    gpu = pick_device() == "cuda"
    name = f"random:{args.random_weights}" if args.random_weights else (args.model or TINY_MODEL)
    tokens = args.output_tokens or (600 if gpu else 16)
    model_opts = ModelOptions(name=name, max_new_tokens=tokens, min_new_tokens=tokens,
                              batch_size=args.batch_size or (16 if gpu else 4))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="docpipe-bench-"))
    paths = make_bench_corpus(work / "corpus", pages=args.pages)
    longest_edge = render_edge_for(resolve_checkpoint(name), model_opts)
    render_opts = RenderOptions()
    print(f"bench: {args.pages} pages in {len(paths)} PDFs, rendered at {longest_edge} px; model {name}, "
          f"{tokens} output tokens per page (forced); {describe_device()}", flush=True)

    results: dict[str, Any] = {"pages": args.pages, "device": describe_device(), "model": name,
                               "output_tokens_per_page": tokens, "longest_edge": longest_edge}
    results.update(measure_render(paths, render_opts, longest_edge))
    results.update(measure_routing(paths, render_opts, longest_edge))
    print("render figures done", flush=True)

    init_ray()
    config = RunConfig(inputs=[str(work / "corpus")], output=str(work / "out"), model=model_opts,
                       render=render_opts, progress=False, num_actors=args.num_actors,
                       route={"text_layer": "never"})  # the model reads every page: that is what is measured
    with _PeakSampler() as peak:
        t0 = time.perf_counter()
        result = run(config)
        wall = time.perf_counter() - t0
    m = result.manifest
    if m.pages.get("ok") != args.pages:
        raise RuntimeError(f"pipeline processed {m.pages} pages, expected {args.pages} ok")
    steady = m.timings["wall_s"] - m.timings["model_ready_s"]
    results.update(
        pipeline_pages_per_s=args.pages / steady,
        pipeline_wall_pages_per_s=args.pages / wall,
        pipeline_startup_s=m.timings["model_ready_s"],
        model_output_tokens_per_s=m.counters.get("output_tokens", 0) / steady,
        peak_rss_bytes=peak.peak_rss,
        gpu_peak_memory_bytes=peak.peak_gpu,
    )
    print("pipeline done", flush=True)
    shutdown_ray()  # frees the cores (and GPU) the pipeline's actors held before the baseline runs
    results.update(measure_baseline(paths, model_opts, longest_edge))
    results["pipeline_vs_baseline"] = results["pipeline_pages_per_s"] / results["baseline_pages_per_s"]
    results["render_vs_bare_render"] = (results["render_pages_per_s_per_core"]
                                        / results["bare_render_pages_per_s_per_core"])
    return results


ROWS = [
    ("render_pages_per_s_per_core", "render stage, pages/s per core", "{:.1f}"),
    ("bare_render_pages_per_s_per_core", "bare PyMuPDF loop, same bytes, pages/s per core", "{:.1f}"),
    ("bare_raster_pages_per_s_per_core", "bare PyMuPDF raster only (uncompacted), pages/s per core", "{:.1f}"),
    ("isolated_render_pages_per_s", "render stage as runs use it (child process, time limits), pages/s", "{:.1f}"),
    ("render_vs_bare_render", "render stage / bare loop", "{:.2f}"),
    ("routed_render_pages_per_s_per_core", "render stage with --text-layer auto, pages/s per core", "{:.1f}"),
    ("model_page_fraction", "pages still sent to the model with --text-layer auto", "{:.3f}"),
    ("text_layer_cpu_s_per_page", "text layer's rules and Markdown alone, CPU s per page", "{:.4f}"),
    ("object_store_bytes_per_page", "object store bytes per page", "{:,.0f}"),
    ("pipeline_pages_per_s", "pipeline pages/s (from first model ready)", "{:.3f}"),
    ("pipeline_wall_pages_per_s", "pipeline pages/s (whole run, start-up included)", "{:.3f}"),
    ("pipeline_startup_s", "pipeline start-up until first model ready, s", "{:.1f}"),
    ("baseline_pages_per_s", "serial baseline pages/s (after model load)", "{:.3f}"),
    ("pipeline_vs_baseline", "pipeline / baseline", "{:.2f}"),
    ("model_output_tokens_per_s", "model output tokens/s (pipeline)", "{:.1f}"),
    ("peak_rss_bytes", "peak RSS, driver + Ray processes (pipeline)", "{:,}"),
    ("gpu_peak_memory_bytes", "peak GPU memory in use (pipeline)", "{:,}"),
]


# Each engine on its own, then each generate option, against the first row, on the same pages and the same
# output lengths (model stage only).
ENGINES: list[tuple[str, dict[str, Any]]] = [
    ("generate, default batch", {"engine": "generate"}),
    ("generate, batch 64", {"engine": "generate", "batch_size": 64}),
    ("continuous", {"engine": "continuous"}),
    ("generate, dtype float32", {"engine": "generate", "dtype": "float32"}),
    ("generate, dtype bfloat16", {"engine": "generate", "dtype": "bfloat16"}),
    ("generate, dtype float16", {"engine": "generate", "dtype": "float16"}),
    ("generate, attention eager", {"engine": "generate", "attention": "eager"}),
    ("generate, attention sdpa", {"engine": "generate", "attention": "sdpa"}),
    ("generate, attention flash_attention_2", {"engine": "generate", "attention": "flash_attention_2"}),
    ("generate, bitsandbytes 8-bit", {"engine": "generate", "quantization": "8bit"}),
    ("generate, bitsandbytes 4-bit nf4", {"engine": "generate", "quantization": "4bit"}),
    # With a static cache on a GPU, generate compiles the forward itself ("reduce-overhead": CUDA graphs) unless
    # told not to; each row below turns that on or off explicitly (auto_compile), so each measures what it says and
    # the torch.compile row compiles once, not a compiled forward again.
    ("generate, static KV cache", {"engine": "generate", "static_cache": True, "auto_compile": False}),
    ("generate, static KV cache + auto-compile",
     {"engine": "generate", "static_cache": True, "auto_compile": True}),
    ("generate, static KV cache + torch.compile",
     {"engine": "generate", "static_cache": True, "compile": True, "auto_compile": False}),
]
# Row settings that are not ModelOptions: applied to the loaded model's generation config.
BENCH_ONLY = {"auto_compile"}

def measure_engines(paths: list[Path], model_opts, longest_edge: int, pages: int,
                    lengths: list[int], only: list[str] | None = None) -> list[dict[str, Any]]:
    """The OCR stage (fast processor, then the engine) under each engine option, every page forced to its own
    length. useful_decode_fraction: tokens kept / decode positions computed, the positions counted as rows
    through the lm_head (a page padded along in a static batch still costs its row)."""
    import gc

    from docpipe.config import RenderOptions
    from docpipe.render.document import expand_document
    from docpipe.model.load import load_model, pick_device
    from docpipe.ocr import OcrStage

    records = []
    for p in paths:
        records += [r for r in expand_document(str(p), RenderOptions(), longest_edge) if r["kind"] == "page"]
        if len(records) >= pages:
            break
    records = records[:pages]
    rows = []
    for label, update in ENGINES:
        if only and label not in only:
            continue
        row: dict[str, Any] = {"engine": label, "options": update}
        reason = _engine_unavailable(update, pick_device(), model_opts.name)
        if reason:
            rows.append(row | {"status": f"not run: {reason}"})
            continue
        loaded = stage = hook = None
        try:
            opts = model_opts.model_copy(update={k: v for k, v in update.items() if k not in BENCH_ONLY})
            loaded = load_model(opts)
            # generate's own compilation (static cache on a GPU) only where the row asks for it
            loaded.model.generation_config.disable_compile = not update.get("auto_compile", False)
            stage = OcrStage(opts, loaded=loaded)
            warm = records[: opts.batch_size]
            stage([dict(r) for r in warm], lengths=lengths[: len(warm)])  # warm-up (and compilation)
            computed = [0]
            hook = loaded.model.lm_head.register_forward_hook(
                lambda _m, inputs, _o: computed.__setitem__(0, computed[0] + inputs[0][..., 0].numel()))
            t0 = time.perf_counter()
            done = stage([dict(r) for r in records], lengths=lengths)
            wall = time.perf_counter() - t0
            failed = [r for r in done if r["status"] != "ok"]
            if failed:
                raise RuntimeError(f"{len(failed)} pages failed: {failed[0]['error_message']}")
            kept = sum(r["output_tokens"] for r in done)
            if kept != sum(lengths):
                raise RuntimeError(f"{kept} tokens kept, {sum(lengths)} forced")
            row |= {"status": "ok", "engine_ran": stage.engine.name, "batch_size": opts.batch_size,
                    "pages_per_s": len(done) / wall, "output_tokens_per_s": kept / wall,
                    "tokens_kept": kept, "decode_positions": computed[0],
                    # CUDA graph replays skip Python hooks: then the positions can't be counted this way.
                    "useful_decode_fraction": kept / computed[0] if computed[0] >= kept else None,
                    "dtype": str(loaded.dtype).replace("torch.", ""), "attention": loaded.attention,
                    "compiled": ("torch.compile" if opts.compile else "") + (
                        "generate's auto-compile" if update.get("auto_compile") else "") or "no"}
        except Exception as exc:
            row |= {"status": f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
        finally:
            if hook is not None:
                hook.remove()
            if stage is not None:
                stage.engine.close()
            loaded = stage = None
            gc.collect()
        rows.append(row)
    base = rows[0].get("pages_per_s")
    for row in rows:
        if base and row.get("pages_per_s"):
            row["vs_first_row"] = row["pages_per_s"] / base
    return rows


def _engine_unavailable(update: dict[str, Any], device: str, name: str) -> str | None:
    import importlib.util

    if update.get("attention") == "flash_attention_2" and (device != "cuda" or not importlib.util.find_spec("flash_attn")):
        return "flash-attn needs CUDA and the flash-attn package (pip install 'docpipe[gpu]')"
    if update.get("auto_compile") and device != "cuda":
        return "generate compiles itself (CUDA graphs) on a GPU only; on this device the row is the static cache's"
    if update.get("quantization"):
        if not importlib.util.find_spec("bitsandbytes"):
            return "bitsandbytes is not installed (pip install 'docpipe[gpu]')"
        if name.startswith("random:"):
            return "quantization applies when loading a checkpoint (from_pretrained), not to random:ARCH weights"
    return None


def main(args) -> None:
    if getattr(args, "gpu_check", False):
        from docpipe.tools.gpu_check import main as gpu_check_main

        gpu_check_main(args)
        return
    if args.engines:
        return engines_main(args)
    if getattr(args, "text_layer", False):
        return text_layer_main(args)
    args.pages = args.pages or 200
    results = run_bench(args)
    print()
    print(f"device: {results['device']}; model: {results['model']}; pages: {results['pages']}")
    for key, label, fmt in ROWS:
        value = results.get(key)
        print(f"  {label:<58} {'n/a' if value is None else fmt.format(value)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


def engines_main(args) -> None:
    from docpipe.tools.corpus import make_bench_corpus, make_image_corpus
    from docpipe.config import TINY_MODEL, ModelOptions
    from docpipe.model.load import pick_device, render_edge_for, resolve_checkpoint

    unknown = set(args.engine_row or []) - {label for label, _ in ENGINES}
    if unknown:
        from docpipe.errors import ConfigError

        raise ConfigError(f"no engine row {sorted(unknown)[0]!r}; the rows are: "
                          + ", ".join(repr(label) for label, _ in ENGINES))
    gpu = pick_device() == "cuda"
    name = f"random:{args.random_weights}" if args.random_weights else (args.model or TINY_MODEL)
    cap = args.output_tokens or (1024 if gpu else 64)
    # GPU: a mean of about 600 tokens per page (the throughput target's), capped at runs' default max_new_tokens
    median = args.median_tokens or (560 if gpu else 24)
    pages = args.pages or (256 if gpu else 64)
    model_opts = ModelOptions(name=name, max_new_tokens=cap, batch_size=args.batch_size or (16 if gpu else 4),
                              cpu_threads=None, do_image_splitting=False if args.no_image_splitting else None)
    lengths = length_mix(pages, median, cap)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="docpipe-bench-"))
    longest_edge = render_edge_for(resolve_checkpoint(name), model_opts)
    try:
        import pymupdf  # noqa: F401

        paths = make_bench_corpus(work / "corpus", pages=pages)
    except ImportError:  # a bare CUDA machine: the same page sizes, drawn with Pillow
        paths = make_image_corpus(work / "corpus-png", pages, longest_edge)
    one_image = ", each one image" if model_opts.do_image_splitting is False else ""
    print(f"bench --engines: {pages} pages at {longest_edge} px{one_image}; model {name}; output lengths lognormal, "
          f"median {median}, spread {LENGTH_SPREAD}, cap {cap} (seed {LENGTH_SEED}): {sum(lengths)} tokens in all; "
          f"default batch {model_opts.batch_size}; {describe_device()}", flush=True)
    rows = measure_engines(paths, model_opts, longest_edge, pages, lengths, args.engine_row)
    print()
    print(f"  {'engine':<42} {'pages/s':>8} {'tokens/s':>9} {'useful':>7} {'vs first':>8}  resolved / status")
    for r in rows:
        if r["status"] == "ok":
            useful = r["useful_decode_fraction"]
            print(f"  {r['engine']:<42} {r['pages_per_s']:>8.3f} {r['output_tokens_per_s']:>9.1f} "
                  f"{'n/a' if useful is None else format(useful, '.3f'):>7} {r.get('vs_first_row', 1.0):>8.2f}  "
                  f"{r['dtype']}, {r['attention']}" + (f", {r['compiled']}" if r["compiled"] != "no" else ""))
        else:
            print(f"  {r['engine']:<42} {'':>8} {'':>9} {'':>7} {'':>8}  {r['status']}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": describe_device(), "model": name, "pages": pages, "max_new_tokens": cap,
            "image_splitting": model_opts.do_image_splitting is not False,  # False: each page one image
            "length_mix": {"distribution": "lognormal", "median": median, "spread": LENGTH_SPREAD, "cap": cap,
                           "seed": LENGTH_SEED, "tokens": sum(lengths)},
            "engines": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
