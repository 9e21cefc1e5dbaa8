"""The OCR stage: page records with images in, page records with the model's text out.

The stage is a plain callable over a list of records; it doesn't know whether it runs in
a loop, a Ray task or a GPU actor. Records it isn't meant to touch (document records,
pages that already failed) pass through unchanged.
"""

from __future__ import annotations

import threading
from typing import Any

from docpipe.config import ModelOptions
from docpipe.errors import describe, error_fields
from docpipe.model.load import LoadedModel, chat_prompt, load_model, model_options, stop_and_pad_ids
from docpipe.records import PAGE
from docpipe.render.pixels import RAW_CODEC, decode_raw
from docpipe.schemas import ErrorType


class OcrStage:
    def __init__(self, opts: ModelOptions, checkpoint: str | None = None, loaded: LoadedModel | None = None,
                 fail_fast: bool = False):
        """``fail_fast``: re-raise the first failure instead of recording an error row (--fail-fast)."""
        from docpipe.model.engine import choose_engine

        self.fail_fast = fail_fast
        self.m = loaded or load_model(opts, checkpoint)
        self.family = self.m.family  # the model family's prompt, inputs and output format (pipeline/model/families/)
        self.opts = opts = model_options(opts, self.family)
        self.prompt = chat_prompt(self.m.processor, 1, opts.prompt)  # one image: the page
        self.stop_ids, self.pad_id = stop_and_pad_ids(self.m)
        self.processor_device = self.m.device if opts.processor_device == "model" else "cpu"
        choice = choose_engine(self.m, opts, self.stop_ids, self.pad_id)
        self.engine, self.engine_record = choice.engine, choice.record
        self._swap = threading.Lock()  # calls in flight (threads) meet here when the continuous loop dies
        self._generate_lock = threading.Lock()  # generate runs one batch at a time, whichever thread asks
        # A fixed output length (benchmarks): generate honours min_new_tokens itself; the continuous engine, which
        # has no minimum, runs such pages with stopping off.
        self.forced = opts.min_new_tokens >= opts.max_new_tokens and self.engine.streams

    def __call__(self, records: list[dict[str, Any]], lengths: list[int] | None = None) -> list[dict[str, Any]]:
        """``lengths``: per page record, an output length to force (benchmarks: a realistic length mix)."""
        out, todo = [], []
        for i, rec in enumerate(records):
            if rec["kind"] != PAGE:
                out.append(rec)
                continue
            rec = {k: v for k, v in rec.items() if k not in ("image", "image_codec")} | {
                "_image": rec.get("image"), "_codec": rec.get("image_codec"), "retries": 0,
                "_cap": lengths[i] if lengths else self.opts.max_new_tokens}
            if rec["status"] == "ok" and rec["_image"] is not None:  # no image: an extract-only run
                try:
                    rec["_pixels"] = decode_page(rec["_image"], rec["_codec"], rec["width"], rec["height"])
                    todo.append(rec)
                    continue
                except Exception as exc:
                    if self.fail_fast:
                        raise
                    rec.update(error_fields(ErrorType.image_decode_error, describe(exc)))
            out.append(rec)
        # Pages padded into one batch should be of similar shape: padding is wasted vision compute.
        todo.sort(key=lambda r: (r["height"] / r["width"], r["height"] * r["width"]))
        forced = self.forced or lengths is not None
        size = self.opts.batch_size
        batches = [todo[start : start + size] for start in range(0, len(todo), size)]
        engine = self.engine  # once per call: another call in flight may swap it for generate mid-way
        if engine.streams:
            self._stream(engine, batches, forced)
        else:
            for batch in batches:
                self._generate_resilient(batch, forced)
        for rec in out + todo:
            for key in ("_image", "_codec", "_pixels", "_cap"):
                rec.pop(key, None)
        return out + todo

    def _stream(self, engine, batches: list[list[dict[str, Any]]], forced: bool) -> None:
        """Continuous engine: every batch is encoded and submitted before any result is awaited, so the
        engine never drains between batches; each page's result or error lands in its own row."""
        from docpipe.model.continuous import LoopDied

        submitted, lost = [], []  # lost: pages the continuous loop took, or refused, and died with
        for batch in batches:
            try:
                submitted.append((batch, engine.submit(self._prepare_for(engine, batch), [r["_cap"] for r in batch],
                                                       forced)))
            except LoopDied:
                lost += batch
            except Exception:
                if self.fail_fast:
                    raise
                _free_cuda_cache()
                if len(batch) == 1:
                    _mark_failed(batch[0])
                    continue
                for rec in batch:  # the batch's encoding failed: each page on its own, so only a bad one fails
                    rec["retries"] += 1
                    try:
                        submitted.append(([rec], engine.submit(self._prepare_for(engine, [rec]), [rec["_cap"]],
                                                               forced)))
                    except LoopDied:
                        lost.append(rec)
                    except Exception:
                        if self.fail_fast:
                            raise
                        _mark_failed(rec)
        for batch, handles in submitted:
            results = engine.wait(handles)
            lost += [rec for rec, r in zip(batch, results) if isinstance(r, LoopDied)]
            kept = [(rec, r) for rec, r in zip(batch, results) if not isinstance(r, LoopDied)]
            self._fill([rec for rec, _ in kept], [r for _, r in kept])
        submitted = handles = results = None  # the dead engine's futures hold its errors: let them go before retrying
        if lost or getattr(engine, "dead", None):
            self._fall_back(engine)
        if lost:  # the loop died under them: generate decodes them as it would have (same greedy tokens)
            for rec in lost:
                rec["retries"] += 1
            size = self.opts.batch_size
            for start in range(0, len(lost), size):
                self._generate_resilient(lost[start : start + size], forced)

    def _prepare_for(self, engine, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Processor output made on the engine's own stream (the image processor may run on the GPU): the decode
        loop's steps never wait behind it."""
        with engine.encoding():
            return self.prepare_inputs(batch)

    def _fall_back(self, dead) -> None:
        """The continuous loop died mid-run: this stage (the whole actor, from its next call on) runs generate,
        and its record says so."""
        from docpipe.model.engine import GenerateEngine

        with self._swap:
            if self.engine is not dead:
                return
            dead.close()
            self.engine = GenerateEngine(self.m, self.opts, self.stop_ids, self.pad_id)
            self.forced = self.opts.min_new_tokens >= self.opts.max_new_tokens and self.engine.streams
            self.engine_record = self.engine_record | {
                "engine": "generate", "reason": f"fallback mid-run: {dead.dead}", "attention": self.m.attention,
                "peak_pages_in_flight": dead.peak_pages_in_flight}  # kept: generate has no figure of its own

    def _generate_resilient(self, batch: list[dict[str, Any]], forced: bool) -> None:
        """Generate for ``batch`` in place; on failure (CUDA out of memory, say) retry in halves, so only a
        failing page is marked and its batch-mates keep their results."""
        if not batch:
            return
        try:
            self._generate(batch, forced)
        except Exception as exc:
            if self.fail_fast:
                raise
            _free_cuda_cache()
            if len(batch) == 1:
                batch[0].update(error_fields(ErrorType.model_error, describe(exc)))
                return
            for rec in batch:
                rec["retries"] += 1
            half = len(batch) // 2
            self._generate_resilient(batch[:half], forced)
            self._generate_resilient(batch[half:], forced)

    def _generate(self, batch: list[dict[str, Any]], forced: bool = False) -> None:
        with self._generate_lock:
            self._fill(batch, self.engine.generate(self.prepare_inputs(batch), [r["_cap"] for r in batch], forced))

    def _fill(self, batch: list[dict[str, Any]], results: list) -> None:
        for rec, result in zip(batch, results):
            if isinstance(result, Exception):
                if self.fail_fast:
                    raise result
                rec.update(error_fields(ErrorType.model_error, describe(result)))
                continue
            kept = result.tokens[:-1] if result.finish_reason == "stop" else result.tokens
            try:  # the family's own output (DocTags, its Markdown flavour) as our Markdown, and its blocks if boxed
                text, blocks = self.family.page_output(self.family.decode(kept))
            except Exception as exc:
                if self.fail_fast:
                    raise
                rec.update(error_fields(ErrorType.model_error, f"cannot read the model's output: {describe(exc)}"))
                continue
            rec.update(
                text=text,
                blocks=blocks,
                output_tokens=len(result.tokens),
                finish_reason=result.finish_reason,
                model=self.m.name,
                text_source="model",
            )

    def prepare_inputs(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Processor output for a batch, on the model's device: input_ids, attention_mask, pixel_values, pixel_attention_mask."""
        return model_inputs(self.m, [self.prompt] * len(batch), [[rec["_pixels"]] for rec in batch],
                            self.processor_device)


def _mark_failed(rec: dict[str, Any]) -> None:
    """The exception being handled, into ``rec``'s error row."""
    import sys

    rec.update(error_fields(ErrorType.model_error, describe(sys.exc_info()[1])))


def model_inputs(m: LoadedModel, prompts: list[str], images: list[list] | None, processor_device: str
                 ) -> dict[str, Any]:
    """Processor output on the model's device, built as the model's family builds it (pipeline/model/families/):
    page images are uint8 tensors, and the image half of the processor runs on ``processor_device`` (the GPU).
    ``images`` None: prompts without images (text-to-JSON)."""
    return m.family.model_inputs(m, prompts, images, processor_device)


def decode_page(data: bytes, codec: str | None, width: int, height: int):
    """A page image as a (3, H, W) uint8 tensor, the layout the torchvision image processor takes."""
    import torch

    if codec == RAW_CODEC:
        array = decode_raw(data, width, height).copy()  # writable, so torch can own it
    else:
        import io

        import numpy as np
        from PIL import Image

        array = np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # a writable copy, so torch can own it
    return torch.from_numpy(array).permute(2, 0, 1)


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
