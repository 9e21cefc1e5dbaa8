"""``docpipe bench --gpu-check``: as much as one short run can tell about a GPU, section by section.

Made for a borrowed GPU machine with minutes to spare: torch and transformers but no Ray and no PyMuPDF (pages
are drawn with Pillow; nothing here imports either). Each section is timed and recorded on its own; one that fails
records its error and the next one runs, and the JSON is rewritten after every section, so a run cut short still
leaves what it measured. On a CPU the same sections run on tiny-random at smaller sizes (a dry run for CI).

- versions: python, torch, transformers, CUDA, GPU name, the dtype and attention the model loads with
- ceilings: measured matmul TFLOP/s and device copy GB/s, what every model figure is compared with
- model_load: loading (random weights for ``random:ARCH``), parameters, memory after loading
- encode: vision tower and connector, milliseconds and peak memory per page, at a few batch sizes
- decode_step: one decode step (text model + lm_head, one token per request) at a few request counts, device
  time (kernels, from the profiler) and wall time, beside its memory roofline at the measured copy rate
- agreement: the generate and continuous engines' greedy texts on the same pages, and the largest first-step
  logit difference between the full model and the continuous engine's feature-bank path
- engines: both engines end to end on a page mix (pages/s, error rows, retries, peak memory, pages in flight)
"""

from __future__ import annotations

import gc
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

SECTIONS = ["versions", "ceilings", "model_load", "encode", "decode_step", "agreement", "engines"]
FAULT_ENV = "DOCPIPE_FAULT_GPU_CHECK"  # fault injection for tests: a section name (or several, comma-separated)


class GpuCheckPlan(BaseModel):
    """The sizes one run measures at. The GPU defaults fit in about 6 minutes with idefics2-8b on one H100;
    the CPU defaults are scaled down so a dry run on tiny-random takes well under 2 minutes."""

    encode_pages: list[int] = Field(description="Pages per vision tower + connector call (5 crops a page).")
    decode_requests: list[int] = Field(description="Requests decoded together in the decode-step section.")
    decode_context: int = Field(
        description="Tokens of context per request during the timed decode steps: the prompt (about 356 with "
        "splitting) plus half a 600-token answer.")
    agreement_pages: int = Field(description="Pages both engines decode greedily and are compared on.")
    agreement_tokens: int = Field(description="max_new_tokens for the agreement pages.")
    pages: int = Field(description="Pages in the end-to-end section, per engine.")
    median_tokens: int = Field(description="Median of the end-to-end output length mix (lognormal, as bench --engines).")
    max_new_tokens: int = Field(description="Cap of the end-to-end output length mix.")
    batch_size: int = Field(description="Pages per generate() batch, or per vision call of the continuous engine.")

    @classmethod
    def for_device(cls, gpu: bool, args=None) -> "GpuCheckPlan":
        plan = cls(encode_pages=[1, 4, 16], decode_requests=[16, 64, 128], decode_context=656, agreement_pages=4,
                   agreement_tokens=32, pages=48, median_tokens=560, max_new_tokens=1024, batch_size=16) if gpu \
            else cls(encode_pages=[1, 2, 4], decode_requests=[16, 64, 128], decode_context=128, agreement_pages=2,
                     agreement_tokens=16, pages=6, median_tokens=24, max_new_tokens=48, batch_size=2)
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
    if out["status"] != "ok" and not any(k in out for k in ("sizes", "batches", "engines")):
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
    if name == "agreement":
        return f"{out['pages_equal']}/{out['pages']} pages equal; max first-step logit difference " \
               f"{out.get('first_step_max_logit_diff')}"
    if name == "engines":
        return "; ".join(f"{e}: " + (f"{r['pages_per_s']:.3f} pages/s, {r['error_rows']} error rows"
                                     if "pages_per_s" in r else r["error"]) for e, r in out["engines"].items())
    return ""


# ------------------------------------------------------------------------------------------------ sections
def versions(loaded_opts) -> dict[str, Any]:
    import torch
    import transformers

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
    }


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
    """Vision tower and connector (perceiver + projection) over n pages' crops, split by a hook where the
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


def agreement(loaded, opts, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The same pages through both engines, greedy: the texts must match. Then the first step's logits of the
    full model (generate's prefill) against the continuous engine's text model fed from its feature bank."""
    import torch

    from docpipe.ocr import OcrStage

    gen = OcrStage(opts.model_copy(update={"engine": "generate"}), loaded=loaded)
    by_gen = gen([dict(r) for r in records])
    cont = OcrStage(opts.model_copy(update={"engine": "continuous"}), loaded=loaded)
    try:
        by_cont = cont([dict(r) for r in records])
        pages = []
        for a, b in zip(by_gen, by_cont):
            pages.append({"page": a.get("page_number"), "equal": (a["status"], a.get("text"), a.get("finish_reason"))
                          == (b["status"], b.get("text"), b.get("finish_reason")),
                          "generate_tokens": a.get("output_tokens"), "continuous_tokens": b.get("output_tokens"),
                          "errors": [r["error_message"] for r in (a, b) if r["status"] != "ok"]})
        out: dict[str, Any] = {"pages": len(pages), "pages_equal": sum(p["equal"] for p in pages),
                               "agree": all(p["equal"] for p in pages), "engines": [gen.engine.name, cont.engine.name],
                               "max_new_tokens": opts.max_new_tokens, "per_page": pages}
        try:
            # The loop stopped first: its stop gives the shell its attention back (5.17-5.19 switch it to paged|sdpa,
            # which then refuses a call without the paged cache); the bank and the shell stay for the comparison.
            getattr(cont.engine, "stop_loop", lambda: None)()
            out["first_step_max_logit_diff"] = _first_step_logit_diff(loaded, cont, records)
            out["logit_dtype"] = str(loaded.dtype).replace("torch.", "")
        except Exception as exc:  # the comparison reaches into the engine: record, don't lose the agreement
            out["first_step_max_logit_diff"] = None
            out["error"] = f"first step: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        return out
    finally:
        cont.engine.close()


def _first_step_logit_diff(loaded, stage, records: list[dict[str, Any]]) -> float:
    import torch

    from docpipe.ocr import decode_page, model_inputs

    engine = stage.engine
    pixels = [decode_page(r["image"], r.get("image_codec"), r["width"], r["height"]) for r in records]
    worst = 0.0
    with torch.inference_mode():
        for px in pixels:  # one page at a time: no padding between the two paths
            inputs = model_inputs(loaded, [stage.prompt], [[px]], loaded.device)
            full = loaded.model(**inputs, logits_to_keep=1).logits[:, -1].float()
            feats = loaded.family.image_features(loaded.model, inputs, slice(None))
            feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
            feats = feats.reshape(-1, feats.shape[-1])
            ids = inputs["input_ids"].clone()
            positions = (ids[0] == engine.image_token_id).nonzero().flatten()
            if len(positions) != feats.shape[0]:
                raise ValueError(f"{len(positions)} image positions for {feats.shape[0]} feature rows")
            engine.bank[: feats.shape[0]].copy_(feats.to(engine.bank.dtype))  # nothing is in flight now
            ids[0, positions] = engine.vocab + torch.arange(len(positions), device=ids.device)
            shell = engine.lm(input_ids=ids, attention_mask=inputs["attention_mask"], logits_to_keep=1)
            worst = max(worst, (shell.logits[:, -1].float() - full).abs().max().item())
    return worst


def engines(loaded, opts, records: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    """Both engines on the same pages, each page forced to its own length (the bench's length mix)."""
    import torch

    from docpipe.ocr import OcrStage

    out: dict[str, Any] = {}
    for name in ("generate", "continuous"):
        row: dict[str, Any] = {}
        stage = None
        try:
            stage = OcrStage(opts.model_copy(update={"engine": name}), loaded=loaded)
            warm = records[: opts.batch_size]
            # warm-up (kernels, allocator, CUDA graphs): short answers, since a GPU minute is scarce
            stage([dict(r) for r in warm], lengths=[min(n, 16) for n in lengths[: len(warm)]])
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            done = stage([dict(r) for r in records], lengths=lengths)
            wall = time.perf_counter() - t0
            errors = [r for r in done if r["status"] != "ok"]
            row = {"engine_ran": stage.engine.name, "choice": stage.engine_record, "pages": len(done),
                   "pages_per_s": len(done) / wall, "wall_s": wall,
                   "output_tokens_per_s": sum(r.get("output_tokens") or 0 for r in done) / wall,
                   "error_rows": len(errors), "first_error": errors[0]["error_message"] if errors else None,
                   "retries": sum(r.get("retries", 0) for r in done),
                   "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
                   # the continuous engine counts the pages it holds; a generate batch holds batch_size
                   "peak_pages_in_flight": getattr(stage.engine, "peak_pages_in_flight", None) or opts.batch_size,
                   "batch_size": opts.batch_size}
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
    # A CPU dry run of a real architecture encodes one image a page, not the whole tile grid: a 2048 px page is 17
    # tiles through granite-docling's vision tower, minutes a page on two cores. The code paths are the same.
    opts = ModelOptions(name=name, max_new_tokens=plan.max_new_tokens, batch_size=plan.batch_size, cpu_threads=None,
                        do_image_splitting=False if args.random_weights and not gpu else None)
    check = _Check(args.json)
    check.results.update({
        "model": name, "cpu_dry_run": not gpu, "plan": plan.model_dump(),
        "note": "on a GPU: the sizes in plan" if gpu else
        "CPU dry run: sizes scaled down (plan), ceilings in float32, no peak GPU memory; figures say nothing "
        "about a GPU"})
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

    def needs_model(fn):
        def run():
            if loaded is None:
                raise RuntimeError("not run: the model did not load (see section 'model_load')")
            return fn()
        return run

    records: list[dict[str, Any]] = []

    def pages_needed():
        if not records:
            records.extend(_page_records(loaded, opts, max(plan.pages, plan.agreement_pages, max(plan.encode_pages)),
                                         args.workdir))
        return records

    def encode_section():
        from docpipe.ocr import decode_page

        recs = pages_needed()[:4]  # a few distinct pages, repeated: the cost depends on the size, not the text
        return encode(loaded, [decode_page(r["image"], r.get("image_codec"), r["width"], r["height"]) for r in recs],
                      plan.encode_pages)

    check.section("encode", needs_model(encode_section))
    kv = (check.results.get("model_load") or {}).get("kv_bytes_per_token")
    check.section("decode_step", needs_model(lambda: decode_step(
        loaded, plan.decode_requests, plan.decode_context, (ceil or {}).get("copy_gb_per_s"), kv or 0)))
    check.section("agreement", needs_model(lambda: agreement(
        loaded, opts.model_copy(update={"max_new_tokens": plan.agreement_tokens}), pages_needed()[: plan.agreement_pages])))

    def engines_section():
        from docpipe.tools.corpus import length_mix

        return engines(loaded, opts, pages_needed()[: plan.pages], length_mix(plan.pages, plan.median_tokens,
                                                                               plan.max_new_tokens))

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


def _page_records(loaded, opts, pages: int, workdir: str | None) -> list[dict[str, Any]]:
    """Page records as runs make them, from pages drawn with Pillow at the render size (no PyMuPDF)."""
    from docpipe.tools.corpus import make_image_corpus
    from docpipe.config import RenderOptions
    from docpipe.render.document import expand_document
    from docpipe.model.load import render_edge_for, resolve_checkpoint

    edge = render_edge_for(resolve_checkpoint(opts.name), opts)
    work = Path(workdir or tempfile.mkdtemp(prefix="docpipe-gpu-check-"))
    records = []
    for p in make_image_corpus(work / "corpus-png", pages, edge):
        records += [r for r in expand_document(str(p), RenderOptions(), edge) if r["kind"] == "page"]
    return records
