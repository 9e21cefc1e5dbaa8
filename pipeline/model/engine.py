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
        with torch.inference_mode():
            generated = self.m.model.generate(
                **inputs, max_new_tokens=max(max_new_tokens), do_sample=False,
                eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **extra,
            )
        return [Generation.from_tokens(tokens, self.stop_ids)
                for tokens in generated[:, inputs["input_ids"].shape[1] :].tolist()]

    def close(self) -> None:
        pass


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
