"""``docpipe bench --gpu-check``: as much as one short run can tell about a GPU, section by section, and why each
figure is what it is.

Made for an offline GPU host with minutes to spare: torch and transformers but no Ray and no PyMuPDF (pages are drawn
with Pillow; nothing here imports either). Each section is timed and recorded on its own; one that fails records its
error and the next one runs, and the JSON is rewritten after every section, so a run cut short still leaves what it
measured. A loop that stalls fails its section after STALL_TIMEOUT_S, not after a run's 600 s. On a CPU the same
sections run on tiny-random at smaller sizes (a dry run for CI; the varlen path runs its CPU reference there).

- versions: python, torch, transformers, CUDA, GPU name, the dtype and attention the model loads with, and the
  attention paths the continuous engine has here (sdpa, torch varlen, flash when importable)
- ceilings: measured matmul TFLOP/s and device copy GB/s: every roofline below is computed at these
- model_load: loading (random weights for ``random:ARCH``), parameters, memory after loading
- encode: vision tower and connector, milliseconds and peak memory per page, at a few batch sizes
- decode_step: one decode step of ``generate`` (text model + lm_head, dynamic cache) at a few request counts
- continuous_step: the continuous engine's own step per attention path, at 16/64/128 requests and at the planned
  pages in flight: ms per step, mean decode batch, tokens/s, bytes per token (sizing.decode_step_cost), each beside
  its roofline at the measured ceilings as a ratio; the engine's plan as numbers
- agreement: generate and the continuous engine per path on the same pages, greedy; a page that differs is judged by
  generate's logit margin at the first differing step (a flip within the dtype's rounding is a near tie), in float32
  where the memory allows a float32 copy of the model, then in the model's dtype
- overlap: several calls in flight (threads) encoding pages while earlier pages decode: the loop's steps during
  encoding, and every page's text against generate's
- engines: both engines end to end, the continuous one on pages enough to reach its planned pages in flight:
  pages/s overall and in the steady state apart from ramp-up and tail, error rows, retries, peak memory
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

SECTIONS = ["versions", "ceilings", "model_load", "encode", "decode_step", "continuous_step", "agreement", "overlap",
            "engines"]
FAULT_ENV = "DOCPIPE_FAULT_GPU_CHECK"  # fault injection for tests: a section name (or several, comma-separated)
# The loop's stall timeout and every wait inside the check: one hang costs this, not the whole call.
STALL_TIMEOUT_S = 90.0
# A flip is a near tie when generate's margin between the two tokens is within this many units of the dtype's
# rounding (finfo.eps) at the size of the step's top logit.
NEAR_TIE_EPS = 4


class GpuCheckPlan(BaseModel):
    """The sizes one run measures at. The GPU defaults fit in about 5 minutes with idefics2-8b on one H100;
    the CPU defaults are scaled down so a dry run on tiny-random takes about a minute."""

    encode_pages: list[int] = Field(description="Pages per vision tower + connector call (5 crops a page).")
    decode_requests: list[int] = Field(description="Requests decoded together in the decode-step section.")
    decode_context: int = Field(
        description="Tokens of context per request during the timed decode steps: the prompt (about 356 with "
        "splitting) plus half a 600-token answer.")
    step_requests: list[int] = Field(
        description="Requests decoding together in the continuous_step section (the planned pages in flight are "
        "added).")
    step_tokens: int = Field(description="Decode steps timed per size in the continuous_step section.")
    step_prompt_tokens: int | None = Field(
        None, description="Prompt tokens per request in the continuous_step section, at most the engine's own (None: "
        "the engine's own, a page's prompt at the render size).")
    agreement_pages: int = Field(description="Pages both engines decode greedily and are compared on.")
    agreement_tokens: int = Field(description="max_new_tokens for the agreement pages.")
    overlap_tokens: int = Field(description="max_new_tokens for the overlap pages: long enough that the first call's "
                                "pages still decode while the later calls encode.")
    overlap_calls: int = Field(description="Calls in flight (threads) in the overlap section, each of batch_size pages.")
    pages: int = Field(description="Pages in the end-to-end section for generate; the continuous engine runs at least "
                       "twice its planned pages in flight.")
    median_tokens: int = Field(description="Median of the end-to-end output length mix (lognormal, as bench --engines).")
    max_new_tokens: int = Field(description="Cap of the end-to-end output length mix.")
    batch_size: int = Field(description="Pages per generate() batch, or per vision call of the continuous engine.")
    distinct_pages: int = Field(description="Pages drawn; longer runs cycle them (the cost depends on the size).")
    page_edge: int | None = Field(None, description="Longest side of the drawn pages, at most the model's render size "
                                  "(None: that size).")

    @classmethod
    def for_device(cls, gpu: bool, args=None) -> "GpuCheckPlan":
        plan = cls(encode_pages=[1, 4, 16], decode_requests=[16, 64, 128], decode_context=656,
                   step_requests=[16, 64, 128], step_tokens=32, agreement_pages=4, agreement_tokens=32,
                   overlap_tokens=96, overlap_calls=3, pages=32, median_tokens=560, max_new_tokens=1024, batch_size=16,
                   distinct_pages=32) if gpu \
            else cls(encode_pages=[1, 2], decode_requests=[4, 16], decode_context=128, step_requests=[2, 4],
                     step_tokens=4, agreement_pages=2, agreement_tokens=12, overlap_tokens=16, overlap_calls=2, pages=4,
                     median_tokens=12, max_new_tokens=24, batch_size=2, distinct_pages=4,
                     # A LightOnOCR page is its whole patch grid: at its 1540 px, 113 s to encode on two cores and
                     # prompts of about 3,000 tokens whose prefill outlasts the stall timeout. An Idefics3 page
                     # without splitting is one 512 px tile whatever the size drawn.
                     page_edge=512, step_prompt_tokens=128)
        if args is not None:  # bench's own flags, where given
            for flag, field in (("pages", "pages"), ("median_tokens", "median_tokens"),
                                ("output_tokens", "max_new_tokens"), ("batch_size", "batch_size")):
                if getattr(args, flag, None):
                    setattr(plan, field, getattr(args, flag))
        return plan


def _fault(section: str) -> None:
    if section in os.environ.get(FAULT_ENV, "").split(","):
        raise RuntimeError(f"fault injected in section {section!r} ({FAULT_ENV})")


class _Check:
    """Runs sections in order, each recorded as ok or failed, and writes the JSON after each."""

    def __init__(self, json_path: str | None):
        self.json_path = json_path
        self.results: dict[str, Any] = {}

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        try:
            _fault(name)
            out = fn()
            # a part that failed (one engine, one size) fails the section; the other parts' figures stay
            out = {"status": "failed" if out.get("error") else "ok", **out}
        except Exception as exc:
            out = {"status": "failed", "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}",
                   "traceback": traceback.format_exc(limit=-4)}
        out["seconds"] = round(time.perf_counter() - t0, 2)
        self.results[name] = out
        _free()
        print(f"[{name}] {out['status']} in {out['seconds']:.1f} s: {_summary(name, out)}", flush=True)
        self.write()
        return out if out["status"] == "ok" else None

    def write(self) -> None:
        if self.json_path:
            Path(self.json_path).write_text(json.dumps(self.results, indent=2, default=str) + "\n")


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _summary(name: str, out: dict[str, Any]) -> str:
    if out["status"] != "ok" and not any(k in out for k in ("sizes", "batches", "engines", "paths", "runs")):
        return out["error"]
    if name == "versions":
        return f"torch {out['torch']}, transformers {out['transformers']}, {out['device_name']}"
    if name == "ceilings":
        return f"matmul {out['matmul_tflops']:.2f} TFLOP/s ({out['matmul_dtype']}), copy {out['copy_gb_per_s']:.1f} GB/s"
    if name == "model_load":
        return f"{out['name']}: {out['parameters'] / 1e9:.2f} B parameters, {out['dtype']}, {out['attention']}"
    if name == "encode":
        return "; ".join(f"{r['pages']} pages: " + (f"{r['ms_per_page']:.1f} ms/page" if "ms_per_page" in r
                                                     else r["error"]) for r in out["sizes"])
    if name == "decode_step":
        return "; ".join(f"{r['requests']} requests: " + (
            f"{r['wall_ms']:.2f} ms wall" + (f", {r['device_ms']:.2f} ms device" if r["device_ms"] else "")
            if "wall_ms" in r else r["error"]) for r in out["batches"])
    if name == "continuous_step":
        return "; ".join(f"{path}: " + ", ".join(
            f"{r['requests']} req {r['ms_per_step']:.2f} ms ({r['roofline_ratio']:.2f} of roofline)"
            if "ms_per_step" in r else f"{r['requests']} req: {r.get('error', 'n/a')}" for r in p.get("sizes", []))
            + (f" [{p['error']}]" if "error" in p and not p.get("sizes") else "")
            for path, p in out["paths"].items())
    if name == "agreement":
        return "; ".join(f"{run['dtype']} {path}: {run['verdicts']}" for run in out.get("runs", [])
                         for path, run in [(run["path"], run)]) or out.get("error", "")
    if name == "overlap":
        return (f"{out['pages_equal']}/{out['pages']} pages equal to generate; {out['steps_during_encode']} loop steps "
                f"during {out['encode_calls']} encode calls")
    if name == "engines":
        return "; ".join(f"{e}: " + (f"{r['pages_per_s']:.3f} pages/s" + (
            f" (steady {r['steady_pages_per_s']:.3f})" if r.get("steady_pages_per_s") else "")
            + f", {r['error_rows']} error rows" if "pages_per_s" in r else r["error"]) for e, r in out["engines"].items())
    return ""


# ------------------------------------------------------------------------------------------------ sections
def versions(loaded_opts) -> dict[str, Any]:
    import torch
    import transformers

    from docpipe.model.attention import varlen_signature
    from docpipe.model.load import pick_attention, pick_device, pick_dtype

    device = pick_device()
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": device, "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_name(),
        "device_memory_gb": torch.cuda.get_device_properties(0).total_memory / 1e9 if cuda else None,
        "torch_threads": torch.get_num_threads(),
        "dtype": str(pick_dtype(loaded_opts, device)).replace("torch.", ""),
        "attention": pick_attention(loaded_opts, device),
        "varlen_attn_parameters": sorted(varlen_signature()),
        "attention_paths": attention_paths(pick_attention(loaded_opts, device)),
    }


def attention_paths(loaded_attention: str) -> list[str]:
    """The continuous engine's attention paths to measure here: transformers' packed sdpa, torch's varlen kernels
    (their CPU reference on a CPU), and flash-attn's paged kernels when the model loads with them."""
    return ["sdpa", "varlen"] + (["flash"] if loaded_attention.startswith("flash") else [])


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{os.cpu_count()} cores, {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"


def ceilings(gpu: bool) -> dict[str, Any]:
    """The best this device does on the two things a decoder needs: dense matmuls and moving bytes."""
    import torch

    device = "cuda" if gpu else "cpu"
    # bf16 on a GPU (what the model runs in); float32 on a CPU, where bf16 matmuls are mostly emulated
    dtype = torch.bfloat16 if gpu else torch.float32
    n, reps = (8192, 20) if gpu else (1024, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    matmul = _best_seconds(lambda: a @ b, reps)
    size = (1 << 30) if gpu else (1 << 27)  # bytes: 1 GiB on a GPU, 128 MiB on a CPU
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = _best_seconds(lambda: dst.copy_(src), reps)
    del a, b, src, dst
    return {"matmul_tflops": 2 * n**3 / matmul / 1e12, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_size": n,
            # a copy reads and writes every byte: both count against the memory bandwidth
            "copy_gb_per_s": 2 * size / copy / 1e9, "copy_bytes": size}


def _best_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    _sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def load(opts) -> tuple[Any, dict[str, Any]]:
    import torch

    from docpipe.model.load import load_model

    _sync()
    t0 = time.perf_counter()
    loaded = load_model(opts)
    _sync()
    seconds = time.perf_counter() - t0
    text = loaded.model.config.text_config
    return loaded, {
        "name": opts.name, "load_s": seconds, "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "dtype": str(loaded.dtype).replace("torch.", ""), "attention": loaded.attention,
        "device_memory_after_load_gb": torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        # computed from the config: K and V, every layer, each kv head
        "kv_bytes_per_token": 2 * text.num_hidden_layers * text.num_key_value_heads
        * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) * loaded.dtype.itemsize,
    }


def encode(loaded, pixels: list, sizes: list[int]) -> dict[str, Any]:
    """Vision tower and connector (the family's: Idefics2's perceiver) over n pages' crops, split by a hook where the
    connector starts. Peak memory is above what was allocated before the call (CUDA only)."""
    import torch

    from docpipe.ocr import model_inputs

    inner = loaded.model.model
    family = loaded.family  # its connector, image features and page prompt (pipeline/model/families/)
    page_prompt = family.chat_prompt(1, "")
    marks: dict[str, float] = {}

    def at_connector(_module, _inputs):
        _sync()
        marks["connector_start"] = time.perf_counter()
        if torch.cuda.is_available():
            marks["vision_peak"] = torch.cuda.max_memory_allocated()

    hook = getattr(inner, family.connector).register_forward_pre_hook(at_connector)
    rows = []
    try:
        run = lambda inputs: family.image_features(loaded.model, inputs, slice(None))  # noqa: E731
        with torch.inference_mode():
            run(model_inputs(loaded, [page_prompt], [[pixels[0]]], "cpu"))  # warm-up: kernels, allocator
            for n in sizes:
                row: dict[str, Any] = {"pages": n}
                try:
                    inputs = model_inputs(loaded, [page_prompt] * n, [[pixels[i % len(pixels)]] for i in range(n)],
                                          loaded.device)
                    pv = inputs["pixel_values"]  # (pages, crops, 3, H, W), or one image a page (LightOnOCR)
                    row["crops"] = int(pv.shape[0] * (pv.shape[1] if pv.dim() == 5 else 1))
                    best = None
                    for _ in range(2 if torch.cuda.is_available() else 1):  # best of 2 on a GPU; a CPU dry run once
                        _sync()
                        base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
                        if torch.cuda.is_available():
                            torch.cuda.reset_peak_memory_stats()
                        t0 = time.perf_counter()
                        run(inputs)
                        _sync()
                        t1 = time.perf_counter()
                        if best is None or t1 - t0 < best[0]:
                            best = (t1 - t0, marks["connector_start"] - t0, t1 - marks["connector_start"], base,
                                    marks.get("vision_peak"),
                                    torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
                    total, vision, connector, base, vision_peak, peak = best
                    row.update(ms=total * 1e3, ms_per_page=total * 1e3 / n, vision_ms_per_page=vision * 1e3 / n,
                               connector_ms_per_page=connector * 1e3 / n)
                    if peak is not None:
                        row.update(peak_gb_per_page=(peak - base) / 1e9 / n,
                                   vision_peak_gb_per_page=(vision_peak - base) / 1e9 / n)
                    del inputs
                except Exception as exc:  # a size that fails (out of memory) is recorded; the next one runs
                    row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                    _free()
                rows.append(row)
    finally:
        hook.remove()
    if not any("ms" in r for r in rows):
        raise RuntimeError("every size failed: " + rows[0]["error"])
    return {**_parts_failed(rows, "pages"), "sizes": rows, "peak_memory": "CUDA allocator peak above the inputs, per page" if torch.cuda.is_available()
            else "not measured on a CPU (no allocator statistics)"}


def decode_step(loaded, requests: list[int], context: int, copy_gb_per_s: float | None, kv_bytes_per_token: int
                ) -> dict[str, Any]:
    """One decode step of B requests, each with ``context`` tokens in its KV cache (random token ids: the cost
    depends on the shapes, not the text), through the model's own forward and dynamic cache, as generate runs it.
    device_ms: kernel time from the profiler (on a CPU: time inside torch's ops); wall_ms: the step as Python
    sees it, launches and synchronisation included."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import inspect

    model = loaded.model
    text = model.config.text_config
    # the cache argument's name: past_key_values until transformers 5.2x renamed it cache (the old name warns)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if "vision" not in n and "connector" not in n)
    gpu = torch.cuda.is_available()
    rows = []
    for b in requests:
        row: dict[str, Any] = {"requests": b, "context": context}
        try:
            g = torch.Generator().manual_seed(b)
            ids = torch.randint(3, text.vocab_size, (b, context), generator=g).to(loaded.device)
            mask = torch.ones_like(ids)
            with torch.inference_mode():
                out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
                cache, nxt = _cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
                del out

                def step():
                    nonlocal cache, nxt, mask
                    mask = torch.cat([mask, mask[:, :1]], dim=1)
                    o = model(input_ids=nxt, attention_mask=mask, use_cache=True, logits_to_keep=1,
                              **{cache_arg: cache})
                    cache, nxt = _cache_of(o), o.logits[:, -1].argmax(-1, keepdim=True)

                for _ in range(2):  # warm-up
                    step()
                _sync()
                walls = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    step()
                    nxt.cpu()  # the step's token reaches the host, as a decode loop needs it
                    walls.append(time.perf_counter() - t0)
                activities = [ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]
                with profile(activities=activities):  # the profiler's own start-up, untimed
                    step()
                steps = 3
                with profile(activities=activities) as prof:
                    for _ in range(steps):
                        step()
                    _sync()
                events = prof.key_averages()
                us = sum(e.self_device_time_total for e in events) if gpu else sum(e.self_cpu_time_total for e in events)
            kv = b * (context + 5) * kv_bytes_per_token
            row.update(wall_ms=min(walls) * 1e3, wall_ms_median=sorted(walls)[len(walls) // 2] * 1e3,
                       # on a CPU there is no device apart: the profiler's op time (inflated by profiling) only
                       # shows the same code runs there
                       **({"device_ms": us / steps / 1e3} if gpu else {"device_ms": None,
                                                                      "profiled_cpu_op_ms": us / steps / 1e3}),
                       tokens_per_s=b / min(walls),
                       weights_and_kv_gb=(weight_bytes + kv) / 1e9)
            if copy_gb_per_s:  # computed: bytes one step must read, at the measured copy rate
                row["memory_roofline_ms"] = (weight_bytes + kv) / (copy_gb_per_s * 1e9) * 1e3
            del cache, nxt, mask, ids
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        _free()
        rows.append(row)
    if not any("wall_ms" in r for r in rows):
        raise RuntimeError("every request count failed: " + rows[0]["error"])
    return {**_parts_failed(rows, "requests"), "batches": rows, "device_time": "CUDA kernel time per step (profiler)" if gpu else
            "none on a CPU (wall_ms is the step)", "text_weight_bytes": weight_bytes}


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# ------------------------------------------------------------------------------------------------ the engine's step
def _engine(loaded, opts, pages: int):
    from docpipe.model.continuous import ContinuousEngine
    from docpipe.model.load import stop_and_pad_ids

    stop_ids, pad_id = stop_and_pad_ids(loaded)
    return ContinuousEngine(loaded, opts, stop_ids, pad_id, pages)


def _cost_path(engine) -> str:
    path = engine.attention_path
    return f"varlen_{'paged' if engine.kernel.paged else 'gathered'}" if path == "varlen" else path


def _decode_shape(loaded):
    from docpipe.model.sizing import DecodeShape

    text_weights = sum(p.numel() * p.element_size() for n, p in loaded.model.named_parameters()
                       if "vision" not in n and "connector" not in n and "embed_tokens" not in n)
    return DecodeShape.of(loaded.model.config.text_config, loaded.dtype.itemsize, text_weights)


def _plan_numbers(engine) -> dict[str, Any]:
    import dataclasses

    if engine.plan is not None:
        return {**dataclasses.asdict(engine.plan), "memory_fraction": engine.plan.memory_fraction(),
                "sized_from": "the GPU memory left after loading (pipeline/model/sizing.py)"}
    return {"pages_in_flight": engine.capacity_pages, "encode_pages": engine.encode_pages,
            "sized_from": "calls_in_flight x rows_per_call (no GPU: nothing sized from memory)"}


def _timed_steps(engine, requests: int, steps: int, seed: int, prompt_tokens: int | None = None) -> dict[str, Any]:
    """``requests`` text-only requests of the engine's prompt length, or ``prompt_tokens`` where shorter (random ids:
    the cost depends on the shapes) decoding together, forced to run ``steps`` decode steps after the last one's prefill: each step's start time
    from the loop (its forward's launch: a sync-mode step starts once the last one's tokens reached the host)."""
    import concurrent.futures

    import torch

    prompt = min(prompt_tokens or engine.prompt_tokens, engine.prompt_tokens)
    batch_tokens = engine.plan.batch_tokens if engine.plan is not None else 2 * engine.prompt_tokens
    prefill_steps = -(-requests * prompt // max(1, batch_tokens - requests))
    new_tokens = steps + prefill_steps + 2
    engine.timeline = {"steps": [], "admitted": [], "completed": [], "encode": []}
    g = torch.Generator().manual_seed(seed)
    try:
        futures = [engine._queue(torch.randint(10, engine.vocab, (prompt,), generator=g).tolist(),
                                 range(0, 0), new_tokens, forced=True) for _ in range(requests)]
        for f in futures:
            try:
                f.result(timeout=STALL_TIMEOUT_S)
            except concurrent.futures.TimeoutError:  # says nothing by itself
                raise concurrent.futures.TimeoutError(f"no result in {STALL_TIMEOUT_S:.0f} s ({requests} requests of "
                                                      f"{prompt} prompt tokens)") from None
        marks = list(engine.timeline["steps"])
    finally:
        engine.timeline = None
    decode = [(t, r) for t, q, r in marks if q == r]  # every request contributes one token: a decode-only step
    full = [i for i, (t, q, r) in enumerate(marks) if q == r == requests and i + 1 < len(marks)]
    intervals = [marks[i + 1][0] - marks[i][0] for i in full]
    if not intervals:
        raise RuntimeError(f"no step with all {requests} requests decoding ({len(marks)} steps)")
    return {"steps": len(marks), "full_decode_steps": len(intervals), "new_tokens": new_tokens,
            "ms_per_step": statistics.median(intervals) * 1e3, "ms_per_step_min": min(intervals) * 1e3,
            "mean_decode_batch": sum(r for _, r in decode) / len(decode),
            "prompt_tokens": prompt, "context": prompt + prefill_steps + new_tokens // 2}


def continuous_step(loaded, opts, requests: list[int], steps: int, ceilings_found: dict[str, Any] | None,
                    paths: list[str], prompt_tokens: int | None = None) -> dict[str, Any]:
    """The continuous engine's own step, per attention path, side by side: at each request count and at the planned
    pages in flight, ms per step (median over the steps where every request decodes), tokens/s, bytes per token
    (computed: sizing.decode_step_cost for the path) and the step's roofline at the measured ceilings, as a ratio
    (roofline / measured: 1.0 is the device's best)."""
    from docpipe.model.sizing import decode_step_cost, step_roofline_s

    shape = _decode_shape(loaded)
    ceil = ceilings_found or {}
    rates = {"copy_bytes_per_s": ceil["copy_gb_per_s"] * 1e9, "matmul_flops": ceil["matmul_tflops"] * 1e12} \
        if ceil.get("copy_gb_per_s") else None
    out: dict[str, Any] = {"paths": {}, "roofline": "bytes at the measured copy rate or FLOPs at the measured matmul "
                           "rate, whichever is longer (pipeline/model/sizing.py; computed)",
                           "weight_bytes": shape.weight_bytes}
    failed = []
    for n, path in enumerate(paths):
        entry: dict[str, Any] = {}
        engine = None
        try:
            path_opts = opts.model_copy(update={"engine": "continuous", "engine_attention": path,
                                                "engine_stall_timeout_s": STALL_TIMEOUT_S})
            engine = _engine(loaded, path_opts, max(requests))
            planned = engine.capacity_pages if engine.plan is not None else opts.pages_in_flight
            entry.update(attention=engine.attention, reason=engine.attention_reason, cost_path=_cost_path(engine),
                         plan={**_plan_numbers(engine), "pages_in_flight": planned})
            sizes = sorted(set(requests) | {planned})
            if max(sizes) > engine.capacity_pages:  # the plan holds fewer (sdpa's cap, memory): sized for the largest
                engine.close()
                engine = _engine(loaded, path_opts.model_copy(update={"max_pages_in_flight": max(sizes)}), max(sizes))
            rows = []
            for b in sizes:
                row: dict[str, Any] = {"requests": b, "planned": b == planned}
                if b > engine.capacity_pages:
                    row["error"] = f"not run: the memory holds {engine.capacity_pages} pages"
                    rows.append(row)
                    continue
                try:
                    row.update(_timed_steps(engine, b, steps, seed=b + 1000 * n, prompt_tokens=prompt_tokens))
                    moved, flops = decode_step_cost(entry["cost_path"], b, row["context"], shape)
                    row.update(tokens_per_s=b / row["ms_per_step"] * 1e3, bytes_per_token=moved / b,
                               flops_per_token=flops / b)
                    if rates:
                        row["roofline_ms"] = step_roofline_s(entry["cost_path"], b, row["context"], shape, **rates) * 1e3
                        row["roofline_ratio"] = row["roofline_ms"] / row["ms_per_step"]
                except Exception as exc:  # a size that fails (out of memory, a stall) is recorded; the next runs
                    row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                rows.append(row)
            entry["sizes"] = rows
            failed += [f"{path} {r['requests']}: {r['error']}" for r in rows
                       if "error" in r and not r["error"].startswith("not run")]
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            failed.append(f"{path}: {entry['error']}")
        finally:
            if engine is not None:
                engine.close()
            engine = None
            _free()
        out["paths"][path] = entry
    if failed:
        out["error"] = "; ".join(failed)
    return out


# ------------------------------------------------------------------------------------------------ agreement
def _generate_with_logits(loaded, opts, records: list[dict[str, Any]], stage, batch: int = 1
                          ) -> list[dict[str, Any]]:
    """Each page through generate (``batch`` pages a call; 1: alone), greedy: its tokens, cut after its first stop
    token, and each step's raw logits (float32)."""
    import torch

    from docpipe.ocr import decode_page, model_inputs

    stop_ids, pad_id = stage.stop_ids, stage.pad_id
    out = []
    with torch.inference_mode():
        for start in range(0, len(records), batch):
            part = records[start : start + batch]
            pixels = [[decode_page(r["image"], r.get("image_codec"), r["width"], r["height"])] for r in part]
            inputs = model_inputs(loaded, [stage.prompt] * len(part), pixels, loaded.device)
            res = loaded.model.generate(**inputs, max_new_tokens=opts.max_new_tokens, do_sample=False,
                                        eos_token_id=stop_ids, pad_token_id=pad_id, output_logits=True,
                                        return_dict_in_generate=True)
            for row in range(len(part)):
                tokens = res.sequences[row, inputs["input_ids"].shape[1]:].tolist()
                end = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
                out.append({"tokens": tokens[:end], "logits": [x[row].float().cpu() for x in res.logits[:end]]})
    return out


def _judge(reference: dict[str, Any], tokens: list[int], dtype) -> dict[str, Any]:
    """Equal, or the first differing step with generate's margin between its token and the other's there: a near
    tie when within NEAR_TIE_EPS x the dtype's eps at the size of the step's top logit."""
    import torch

    ref = reference["tokens"]
    at = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), None)
    if at is None:
        if len(ref) == len(tokens):
            return {"verdict": "equal"}
        at = min(len(ref), len(tokens))
        return {"verdict": "disagree", "first_difference": at, "why": f"lengths {len(ref)} and {len(tokens)}"}
    if at >= len(reference["logits"]):
        return {"verdict": "disagree", "first_difference": at, "why": "past generate's logits"}
    logits = reference["logits"][at]
    margin = float(logits[ref[at]] - logits[tokens[at]])
    # the top logit's own size: a far negative logit elsewhere says nothing of the top's rounding
    tolerance = NEAR_TIE_EPS * torch.finfo(dtype).eps * max(1.0, abs(float(logits.max())))
    return {"verdict": "near tie" if margin <= tolerance else "disagree", "first_difference": at,
            "margin": margin, "tolerance": tolerance, "tokens": [ref[at], tokens[at]]}


def _continuous_tokens(loaded, opts, records: list[dict[str, Any]]) -> tuple[list, Any]:
    """Each page's tokens through the continuous engine with ``opts`` (one submit: the pages decode together)."""
    from docpipe.ocr import OcrStage, decode_page

    stage = OcrStage(opts.model_copy(update={"engine": "continuous", "engine_stall_timeout_s": STALL_TIMEOUT_S}),
                     loaded=loaded)
    engine = stage.engine
    try:
        if engine.name != "continuous":
            raise RuntimeError(f"the continuous engine did not start: {stage.engine_record['reason']}")
        batch = [dict(r, _pixels=decode_page(r["image"], r.get("image_codec"), r["width"], r["height"]))
                 for r in records]
        results = engine.wait(engine.submit(stage._prepare_for(engine, batch), [opts.max_new_tokens] * len(batch)))
        for r in results:
            if isinstance(r, Exception):
                raise r
        return [r.tokens for r in results], engine.attention
    finally:
        engine.close()


def agreement(loaded, opts, records: list[dict[str, Any]], paths: list[str]) -> dict[str, Any]:
    """generate and the continuous engine per attention path on the same pages, greedy. In float32 first where a
    float32 copy of the model fits (FlashAttention kernels take 16-bit only: there, sdpa), then in the model's dtype
    on every path. A page that differs is judged by generate's logit margin at the first differing step."""
    import torch

    from docpipe.model.load import load_model
    from docpipe.ocr import OcrStage

    runs, failed = [], []
    models = []
    if loaded.dtype != torch.float32 and torch.cuda.is_available():
        params = sum(p.numel() for p in loaded.model.parameters())
        free, _ = torch.cuda.mem_get_info()
        if 4 * params < 0.7 * free:
            models.append(("float32", lambda: load_model(opts.model_copy(update={"dtype": "float32"})), ["sdpa"]))
        else:
            runs.append({"dtype": "float32", "path": "-", "verdicts": "not run",
                         "why": f"a float32 copy needs {4 * params / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free"})
    models.append((str(loaded.dtype).removeprefix("torch."), lambda: loaded, paths))
    for dtype_name, get, dtype_paths in models:
        model = None
        try:
            model = get()
            stage = OcrStage(opts.model_copy(update={"engine": "generate"}), loaded=model)
            reference = _generate_with_logits(model, opts, records, stage)
            for path in dtype_paths:
                run: dict[str, Any] = {"dtype": dtype_name, "path": path}
                try:
                    tokens, attention = _continuous_tokens(model, opts.model_copy(update={"engine_attention": path}),
                                                           records)
                    pages = [{"page": i, **_judge(ref, t, model.dtype), "generate_tokens": len(ref["tokens"]),
                              "continuous_tokens": len(t)} for i, (ref, t) in enumerate(zip(reference, tokens))]
                    counts = {v: sum(p["verdict"] == v for p in pages) for v in ("equal", "near tie", "disagree")}
                    run.update(attention=attention, pages=pages, agree=counts["disagree"] == 0,
                               verdicts=", ".join(f"{n} {v}" for v, n in counts.items() if n))
                    if counts["disagree"]:
                        failed.append(f"{dtype_name} {path}: {counts['disagree']} page(s) disagree")
                except Exception as exc:
                    run["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                    run["verdicts"] = "failed"
                    failed.append(f"{dtype_name} {path}: {run['error']}")
                runs.append(run)
        except Exception as exc:
            runs.append({"dtype": dtype_name, "path": "-", "verdicts": "failed",
                         "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
            failed.append(f"{dtype_name}: {runs[-1]['error']}")
        finally:
            if model is not None and model is not loaded:
                del model
            _free()
    out: dict[str, Any] = {"runs": runs, "pages": len(records), "max_new_tokens": opts.max_new_tokens,
                           "near_tie": f"margin <= {NEAR_TIE_EPS} x finfo(dtype).eps x max(1, |top logit|)"}
    if failed:
        out["error"] = "; ".join(failed)
    return out


# ------------------------------------------------------------------------------------------------ overlap
def overlap(loaded, opts, records: list[dict[str, Any]], calls: int) -> dict[str, Any]:
    """``calls`` calls in flight (threads), the first decoding while the others encode theirs (each in two vision
    calls): the loop's steps that start while a later call encodes (none when encoding and decoding serialise),
    and each page's tokens against generate's for that page alone, judged as in ``agreement``."""
    from docpipe.ocr import OcrStage, decode_page

    size = max(1, len(records) // calls)
    parts = [records[i * size : (i + 1) * size] for i in range(calls)]
    stage = OcrStage(opts.model_copy(update={"engine": "generate"}), loaded=loaded)
    reference = dict(zip((r["source_uri"] for r in records),
                         _generate_with_logits(loaded, opts, records, stage, batch=len(records))))
    stage = OcrStage(opts.model_copy(update={"engine": "continuous", "engine_stall_timeout_s": STALL_TIMEOUT_S}),
                     loaded=loaded)
    engine = stage.engine
    tokens: dict[str, list[int]] = {}
    errors: list[str] = []
    try:
        if engine.name != "continuous":
            raise RuntimeError(f"the continuous engine did not start: {stage.engine_record['reason']}")
        engine.encode_pages = max(1, size // 2)
        engine.timeline = {"steps": [], "admitted": [], "completed": [], "encode": []}

        def call(part):
            try:
                batch = [dict(r, _pixels=decode_page(r["image"], r.get("image_codec"), r["width"], r["height"]))
                         for r in part]
                handles = engine.submit(stage._prepare_for(engine, batch), [opts.max_new_tokens] * len(batch))
                for r, result in zip(part, engine.wait(handles)):
                    if isinstance(result, Exception):
                        errors.append(f"{r['source_uri']}: {type(result).__name__}: {result}")
                    else:
                        tokens[r["source_uri"]] = result.tokens
            except Exception as exc:  # recorded: the check goes on
                errors.append(f"{type(exc).__name__}: {exc}")

        first = threading.Thread(target=call, args=(parts[0],))
        first.start()
        decoding, deadline = threading.Event(), time.monotonic() + STALL_TIMEOUT_S
        while not engine.timeline["steps"] and time.monotonic() < deadline and first.is_alive():
            decoding.wait(0.01)  # until the first call's pages decode
        others = [threading.Thread(target=call, args=(part,)) for part in parts[1:]]
        for t in others:
            t.start()
        for t in [first, *others]:
            t.join(timeout=STALL_TIMEOUT_S)
        steps = [t for t, _, _ in engine.timeline["steps"]]
        # encode calls that began once pages were decoding: the later calls'
        later = [(a, b) for a, b, _ in engine.timeline["encode"] if steps and a > steps[0]]
        encode_calls = len(engine.timeline["encode"])
        engine.timeline = None
    finally:
        engine.close()
    pages = [{"page": uri, **_judge(reference[uri], t, loaded.dtype)} for uri, t in tokens.items()]
    counts = {v: sum(p["verdict"] == v for p in pages) for v in ("equal", "near tie", "disagree")}
    during = [t for t in steps if any(a <= t <= b for a, b in later)]
    out = {"pages": len(records), "pages_equal": counts["equal"], "near_ties": counts["near tie"],
           "calls": calls, "encode_calls": encode_calls, "later_encode_calls": len(later), "steps": len(steps), "steps_during_encode": len(during),
           "later_encode_s": sum(b - a for a, b in later), "attention": engine.attention,
           "per_page": [p for p in pages if p["verdict"] != "equal"]}
    problems = errors + ([f"{counts['disagree']} page(s) disagree with generate"] if counts["disagree"] else [])
    if len(tokens) < len(records):
        problems.append(f"{len(records) - len(tokens)} page(s) without tokens")
    if problems:
        out["error"] = "; ".join(problems[:5])
    return out


# ------------------------------------------------------------------------------------------------ end to end
def _steady(timeline: dict[str, list], planned: int) -> dict[str, Any]:
    """Ramp-up: until pages in flight first reach the most the run held (its plan, or all its pages); tail: after
    the last page was admitted. Steady pages/s: pages completed between the two, per second."""
    admitted, completed = timeline["admitted"], timeline["completed"]
    if not admitted or not completed:
        return {}
    start = admitted[0][0]
    peak = max(n for _, n in admitted)
    ramp_end = next(t for t, n in admitted if n == peak)
    tail_start = admitted[-1][0]
    steady = [t for t in completed if ramp_end <= t <= tail_start]
    out = {"ramp_s": ramp_end - start, "steady_s": tail_start - ramp_end, "tail_s": max(completed) - tail_start,
           "peak_pages_in_flight": peak, "reached_plan": peak >= planned}
    if tail_start > ramp_end and steady:
        out["steady_pages_per_s"] = len(steady) / (tail_start - ramp_end)
    return out


def engines(loaded, opts, records: list[dict[str, Any]], lengths: list[int], generate_pages: int) -> dict[str, Any]:
    """generate on ``generate_pages`` pages and the continuous engine on all of them (at least twice its planned
    pages in flight), each page forced to its own length (the bench's length mix)."""
    import torch

    from docpipe.ocr import OcrStage

    out: dict[str, Any] = {}
    for name in ("generate", "continuous"):
        row: dict[str, Any] = {}
        stage = None
        recs, lens = (records[:generate_pages], lengths[:generate_pages]) if name == "generate" else (records, lengths)
        try:
            stage = OcrStage(opts.model_copy(update={"engine": name, "engine_stall_timeout_s": STALL_TIMEOUT_S}),
                             loaded=loaded)
            warm = recs[: opts.batch_size]
            # warm-up (kernels, allocator, CUDA graphs): short answers, since a GPU minute is scarce
            stage([dict(r) for r in warm], lengths=[min(n, 16) for n in lens[: len(warm)]])
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            timeline = {"steps": [], "admitted": [], "completed": [], "encode": []}
            if name == "continuous":
                stage.engine.timeline = timeline
            t0 = time.perf_counter()
            done = stage([dict(r) for r in recs], lengths=lens)
            wall = time.perf_counter() - t0
            errors = [r for r in done if r["status"] != "ok"]
            planned = getattr(stage.engine, "capacity_pages", None) or opts.batch_size
            row = {"engine_ran": stage.engine.name, "choice": stage.engine_record, "pages": len(done),
                   "pages_per_s": len(done) / wall, "wall_s": wall,
                   "output_tokens_per_s": sum(r.get("output_tokens") or 0 for r in done) / wall,
                   "error_rows": len(errors), "first_error": errors[0]["error_message"] if errors else None,
                   "retries": sum(r.get("retries", 0) for r in done),
                   "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
                   # the continuous engine counts the pages it holds; a generate batch holds batch_size
                   "peak_pages_in_flight": getattr(stage.engine, "peak_pages_in_flight", None) or opts.batch_size,
                   "planned_pages_in_flight": planned, "batch_size": opts.batch_size}
            if name == "continuous":
                row.update(_steady(timeline, planned))
                steps = timeline["steps"]
                decode = [r for _, q, r in steps if q == r]
                row.update(steps=len(steps), mean_decode_batch=sum(decode) / len(decode) if decode else None,
                           steps_per_s=len(steps) / wall)
                stage.engine.timeline = None
        except Exception as exc:  # one engine failing must not hide the other's figures
            row = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
        finally:
            if stage is not None:
                stage.engine.close()
            stage = None
            _free()
        out[name] = row
    return {**_parts_failed([{"engine": k, **v} for k, v in out.items()], "engine"), "engines": out,
            "pages": len(records), "output_tokens": sum(lengths)}


def _parts_failed(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    failed = [f"{r[key]}: {r['error']}" for r in rows if "error" in r]
    return {"error": "; ".join(failed)} if failed else {}


# ------------------------------------------------------------------------------------------------ the command
def main(args) -> dict[str, Any]:
    from docpipe.config import TINY_MODEL, ModelOptions
    from docpipe.model.load import pick_device

    t_start = time.perf_counter()
    gpu = pick_device() == "cuda"
    plan = GpuCheckPlan.for_device(gpu, args)
    name = f"random:{args.random_weights}" if args.random_weights else (args.model or TINY_MODEL)
    opts = ModelOptions(name=name, max_new_tokens=plan.max_new_tokens, batch_size=plan.batch_size, cpu_threads=None,
                        engine_stall_timeout_s=STALL_TIMEOUT_S,
                        # on a CPU the feature bank holds calls_in_flight x rows_per_call pages: a small one here;
                        # one image a page, not 5 crops or the whole tile grid (a 2048 px page is 17 tiles through
                        # granite-docling's vision tower, minutes a page on two cores): the code paths are the same
                        **({} if gpu else {"sort_window": 1, "do_image_splitting": False}))
    check = _Check(args.json)
    check.results.update({
        "model": name, "cpu_dry_run": not gpu, "plan": plan.model_dump(), "stall_timeout_s": STALL_TIMEOUT_S,
        "note": "on a GPU: the sizes in plan" if gpu else
        "CPU dry run: sizes scaled down (plan), ceilings in float32, no peak GPU memory, the varlen path on its CPU "
        "reference; figures say nothing about a GPU"})
    print(f"bench --gpu-check: model {name}; " + ("GPU sizes" if gpu else "CPU dry run, sizes scaled down")
          + f": {plan.model_dump()}", flush=True)

    check.section("versions", lambda: versions(opts))
    ceil = check.section("ceilings", lambda: ceilings(gpu))
    state: dict[str, Any] = {}

    def model_section():
        state["loaded"], info = load(opts)
        return info

    check.section("model_load", model_section)
    loaded = state.get("loaded")
    paths = attention_paths(loaded.attention) if loaded is not None else []

    def needs_model(fn):
        def run():
            if loaded is None:
                raise RuntimeError("not run: the model did not load (see section 'model_load')")
            return fn()
        return run

    drawn: list[dict[str, Any]] = []

    def pages_needed(n: int) -> list[dict[str, Any]]:
        """n page records, cycling plan.distinct_pages drawn pages (each with its own source_uri)."""
        if not drawn:
            drawn.extend(_page_records(loaded, opts, plan.distinct_pages, args.workdir, plan.page_edge))
        return [dict(drawn[i % len(drawn)], source_uri=f"{drawn[i % len(drawn)]['source_uri']}#{i}")
                for i in range(n)]

    def encode_section():
        from docpipe.ocr import decode_page

        recs = pages_needed(4)  # a few distinct pages, repeated: the cost depends on the size, not the text
        return encode(loaded, [decode_page(r["image"], r.get("image_codec"), r["width"], r["height"]) for r in recs],
                      plan.encode_pages)

    check.section("encode", needs_model(encode_section))
    kv = (check.results.get("model_load") or {}).get("kv_bytes_per_token")
    check.section("decode_step", needs_model(lambda: decode_step(
        loaded, plan.decode_requests, plan.decode_context, (ceil or {}).get("copy_gb_per_s"), kv or 0)))
    check.section("continuous_step", needs_model(lambda: continuous_step(
        loaded, opts, plan.step_requests, plan.step_tokens, ceil, paths, plan.step_prompt_tokens)))
    short = opts.model_copy(update={"max_new_tokens": plan.agreement_tokens})
    check.section("agreement", needs_model(lambda: agreement(loaded, short, pages_needed(plan.agreement_pages),
                                                             paths)))
    check.section("overlap", needs_model(lambda: overlap(
        loaded, opts.model_copy(update={"max_new_tokens": plan.overlap_tokens}),
        pages_needed(plan.overlap_calls * min(4, plan.batch_size)), plan.overlap_calls)))

    def engines_section():
        from docpipe.tools.corpus import length_mix

        planned = max([r.get("plan", {}).get("pages_in_flight") or 0 for r in
                       (check.results.get("continuous_step") or {}).get("paths", {}).values()] or [0])
        pages = max(plan.pages, 2 * planned)
        return engines(loaded, opts, pages_needed(pages), length_mix(pages, plan.median_tokens, plan.max_new_tokens),
                       generate_pages=plan.pages)

    check.section("engines", needs_model(engines_section))
    check.results["wall_s"] = time.perf_counter() - t_start
    check.results["failed_sections"] = [s for s in SECTIONS if check.results.get(s, {}).get("status") != "ok"]
    check.write()
    print(f"bench --gpu-check: {len(SECTIONS) - len(check.results['failed_sections'])}/{len(SECTIONS)} sections ok "
          f"in {check.results['wall_s']:.0f} s" + (f"; wrote {args.json}" if args.json else ""), flush=True)
    if check.results["failed_sections"]:  # every section ran; the exit status still says not all is well
        from docpipe.errors import FatalError

        raise FatalError(f"gpu-check: section(s) failed: {', '.join(check.results['failed_sections'])}"
                         + (f" (errors in {args.json})" if args.json else ""))
    return check.results


def _page_records(loaded, opts, pages: int, workdir: str | None, max_edge: int | None = None
                  ) -> list[dict[str, Any]]:
    """Page records as runs make them, from pages drawn with Pillow at the render size, or ``max_edge`` where smaller
    (no PyMuPDF)."""
    from docpipe.tools.corpus import make_image_corpus
    from docpipe.config import RenderOptions
    from docpipe.render.document import expand_document
    from docpipe.model.load import render_edge_for, resolve_checkpoint

    edge = min(render_edge_for(resolve_checkpoint(opts.name), opts), max_edge or 1 << 30)
    work = Path(workdir or tempfile.mkdtemp(prefix="docpipe-gpu-check-"))
    records = []
    for p in make_image_corpus(work / "corpus-png", pages, edge):
        records += [r for r in expand_document(str(p), RenderOptions(), edge) if r["kind"] == "page"]
    return records
