"""Engines: processor output for a batch of pages (token ids, pixel values) in, generated tokens out.

- ``generate``: transformers' ``generate`` on static batches; every page of a batch decodes until its
  longest page is done. For comparison, and for models the continuous engine cannot serve.
- ``continuous``: transformers' continuous-batching manager behind a feature bank
  (pipeline/model/continuous.py); a page leaves the batch when it is done and the next one takes its slot.

``wants_continuous`` is the one place that decides what ``auto`` means (continuous on a GPU); ``choose_engine``
turns ``ModelOptions.engine`` into one of the engines with it and says why, for the run's manifest, and the
executor's resource policy (pipeline/execute/resources.py) asks it how many calls an actor takes.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from docpipe.errors import ModelLoadError, describe
from docpipe.model.generation import Generation

log = logging.getLogger(__name__)


@dataclass
class EngineChoice:
    engine: Any
    record: dict[str, Any] = field(default_factory=dict)  # {"engine", "requested", "reason"}: for the manifest


class GenerateEngine:
    """Static batches through ``generate``. A failing batch raises; the caller retries it in halves."""

    name = "generate"
    streams = False

    def __init__(self, loaded, opts, stop_ids: list[int], pad_id: int):
        self.m, self.opts, self.stop_ids, self.pad_id = loaded, opts, stop_ids, pad_id
        # The vision tower and connector run this many pages a call inside generate, as in the continuous engine:
        # the encoding's peak memory is bounded whatever the batch (a batch of 64 at once needs ~120 GB on an 8B).
        self.encode_pages = encode_pages_for(loaded, opts)

    def generate(self, inputs: dict[str, Any], max_new_tokens: list[int], forced: bool = False
                 ) -> list[Generation | Exception]:
        import torch
        from transformers import LogitsProcessorList

        extra: dict[str, Any] = {"cache_implementation": "static"} if self.opts.static_cache else {}
        if forced:  # each page stops at its own length: the waste of a static batch, measured
            prompt = inputs["input_ids"].shape[1]
            extra["logits_processor"] = LogitsProcessorList([_StopAt(max_new_tokens, prompt, self.stop_ids)])
        elif self.opts.min_new_tokens:
            extra["min_new_tokens"] = self.opts.min_new_tokens
        with torch.inference_mode(), bounded_encoding(self.m.model, self.encode_pages):
            generated = self.m.model.generate(
                **inputs, max_new_tokens=max(max_new_tokens), do_sample=False,
                eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **extra,
            )
        return [Generation.from_tokens(tokens, self.stop_ids)
                for tokens in generated[:, inputs["input_ids"].shape[1] :].tolist()]

    def close(self) -> None:
        pass


def encode_pages_for(loaded, opts) -> int:
    """Pages per vision call: batch_size on a CPU; on a GPU what the encoding's share of the free memory holds
    (pipeline/model/sizing.py), at most batch_size."""
    if loaded.device != "cuda":
        return max(1, opts.batch_size)
    from docpipe.model.sizing import device_memory, encode_pages

    try:
        per_page = loaded.family.encode_bytes_per_page(loaded.model.config, loaded.dtype.itemsize)
        free, total = device_memory(opts)
    except (AttributeError, RuntimeError):  # a family the estimate does not know, no device to ask: one batch a call
        return max(1, opts.batch_size)
    return encode_pages(free, total, per_page, opts.batch_size)


class bounded_encoding:
    """Within it, ``model.model.get_image_features`` encodes ``pages`` pages a call (split along the batch, the
    pooled rows concatenated in order: each page's images are encoded on their own, so the rows are the same).
    Other fields of its output (the vision tower's last hidden state) would be the first chunk's only: set to None."""

    def __init__(self, model, pages: int):
        self.inner, self.pages = getattr(model, "model", None), max(1, pages)

    def __enter__(self):
        original = getattr(self.inner, "get_image_features", None)
        if original is None:
            return self
        pages = self.pages

        # the original's signature shows through: transformers' generate (5.2x) passes it the inputs its signature
        # names (Idefics' pixel_attention_mask, LightOnOCR's image_sizes)
        @functools.wraps(original)
        def chunked(pixel_values, *args, **kwargs):
            import torch

            n = pixel_values.shape[0] if isinstance(pixel_values, torch.Tensor) else 0
            if n <= pages:
                return original(pixel_values, *args, **kwargs)

            def part(value, i):  # the per-page arguments (Idefics' pixel_attention_mask, LightOnOCR's image_sizes)
                per_page = isinstance(value, (torch.Tensor, list, tuple)) and len(value) == n
                return value[i : i + pages] if per_page else value

            outs = [original(pixel_values[i : i + pages], *(part(a, i) for a in args),
                             **{k: part(v, i) for k, v in kwargs.items()}) for i in range(0, n, pages)]
            pooled = [o.pooler_output for o in outs]
            merged = (type(pooled[0])(x for p in pooled for x in p) if isinstance(pooled[0], (list, tuple))
                      else torch.cat(pooled))
            first = outs[0]
            for key in list(first.keys()):
                if key != "pooler_output":
                    first[key] = None
            first.pooler_output = merged
            return first

        self.inner.get_image_features = chunked
        return self

    def __exit__(self, *exc):
        if self.inner is not None and "get_image_features" in vars(self.inner):
            del self.inner.get_image_features


class _StopAt:
    """Forces row i to emit a stop token as its ``lengths[i]``-th token and forbids all of them before (a fixed
    output length per page, for benchmarks)."""

    def __init__(self, lengths: list[int], prompt: int, stop_ids: list[int]):
        self.lengths, self.prompt, self.stop_ids = lengths, prompt, stop_ids

    def __call__(self, input_ids, scores):
        import torch

        step = input_ids.shape[1] - self.prompt  # tokens generated so far
        lengths = torch.tensor(self.lengths, device=scores.device)
        at_end = (step + 1 >= lengths).unsqueeze(1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.stop_ids[0]] = 0
        scores = scores.clone()
        scores[:, self.stop_ids] = float("-inf")
        return torch.where(at_end, forced, scores)


def wants_continuous(requested: str, on_gpu: bool) -> bool:
    """Whether ``ModelOptions.engine`` asks for the continuous engine: ``auto`` means continuous on a GPU, generate
    on a CPU (where its scheduling costs more than it saves for small models)."""
    return requested == "continuous" or (requested == "auto" and on_gpu)


def choose_engine(loaded, opts, stop_ids: list[int], pad_id: int) -> EngineChoice:
    """``auto``: continuous on CUDA, generate on a CPU (where its scheduling costs more than it saves for
    small models). On CUDA ``auto`` never gambles a run on the continuous engine: if it can't start (its start
    check sends one real request through the running loop), the actor runs generate and the manifest says why.
    A loop that dies later is replaced by generate in the OCR stage (pipeline/ocr.py)."""
    requested = opts.engine
    if not wants_continuous(requested, on_gpu=loaded.device == "cuda" or _fault_injected()):
        return EngineChoice(GenerateEngine(loaded, opts, stop_ids, pad_id),
                            {"engine": "generate", "requested": requested,
                             "reason": "requested" if requested == "generate" else f"auto on {loaded.device}",
                             "attention": loaded.attention})
    problem = continuous_unsupported(opts)
    if problem is None:
        try:
            from docpipe.model.continuous import ContinuousEngine

            engine = ContinuousEngine(loaded, opts, stop_ids, pad_id, opts.pages_in_flight)
            reason = "requested" if requested == "continuous" else f"auto on {loaded.device}"
            return EngineChoice(engine, {"engine": "continuous", "requested": requested,
                                         "reason": "; ".join(x for x in (reason, engine.note) if x),
                                         "attention": engine.attention})
        except Exception as exc:
            problem = f"could not start: {describe(exc)}"
    if requested == "continuous":
        raise ModelLoadError(f"the continuous engine cannot serve {opts.name!r}: {problem} (use --engine generate)")
    log.warning("docpipe: continuous engine unavailable, this actor runs generate: %s", problem)
    return EngineChoice(GenerateEngine(loaded, opts, stop_ids, pad_id),
                        {"engine": "generate", "requested": requested, "reason": f"fallback: {problem}",
                         "attention": loaded.attention})


def _fault_injected() -> bool:
    """DOCPIPE_FAULT_CB (tests): ``auto`` tries the continuous engine on a CPU too, so its fallback is what runs."""
    import os

    return bool(os.environ.get("DOCPIPE_FAULT_CB"))


def continuous_unsupported(opts) -> str | None:
    """Options the continuous engine can't honour, or None."""
    if 0 < opts.min_new_tokens < opts.max_new_tokens:
        return "min_new_tokens below max_new_tokens (it can force a whole length only)"
    if opts.static_cache or opts.compile:
        return "static_cache and compile are generate options (the continuous engine has its own paged cache)"
    return None
