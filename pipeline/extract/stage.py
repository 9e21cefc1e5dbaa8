"""JSON extraction: a document's pages in, a schema-valid JSON object out.

Generation is constrained by a grammar compiled from the schema (xgrammar), so the
output always has the schema's JSON shape; pydantic (or jsonschema, for a JSON Schema
file) then validates it, custom validators included. A failed validation is data in
the row, never an exception.

A model that follows instructions reads the chunk's page images with the schema's prompt. An OCR-only model
(the DocTags models, LightOnOCR: its family says so) reads the pages as it does for OCR, and the text it wrote
goes, with the same prompt, grammar and validation, to an instruction-following extraction model
(``ExtractOptions.model``): never an empty answer for want of a model that can follow the prompt.
"""

from __future__ import annotations

import json
from typing import Any

from docpipe.config import ExtractOptions, ModelOptions
from docpipe.errors import describe, error_fields
from docpipe.records import CHUNK
from docpipe.extract.grammar import GrammarProcessor, RepetitionGuard, repetition_end, build_grammar
from docpipe.extract.schema import instruction, load_schema
from docpipe.schemas import ErrorType


class ExtractStage:
    """Chunk records (a document's pages, up to the page cap) in, extraction results out."""

    def __init__(self, opts: ModelOptions, extract: ExtractOptions, loaded, fail_fast: bool = False, spec=None,
                 ocr=None):
        """``fail_fast``: re-raise the first failure instead of recording an error row (--fail-fast). ``spec``: the
        schema the driver loaded (a user's class travels with it), else loaded here from ``extract``. ``ocr``: the
        actor's OCR stage on ``loaded``, which reads the pages when that model is OCR-only."""
        import xgrammar as xgr

        self.opts, self.extract, self.fail_fast = opts, extract, fail_fast
        self.spec = spec or load_schema(extract.schema_spec)
        self.reader = None  # OCR-only models: the stage that reads the pages, before text-to-JSON
        if not loaded.family.follows_instructions:
            from docpipe.ocr import OcrStage

            self.reader = ocr or OcrStage(opts, loaded=loaded, fail_fast=fail_fast)
            loaded = load_extraction_model(opts, extract)
        self.m = loaded
        from docpipe.model.load import stop_and_pad_ids

        tokenizer = loaded.processor.tokenizer
        self.stop_ids, self.pad_id = stop_and_pad_ids(loaded)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=loaded.model.get_output_embeddings().weight.shape[0], stop_token_ids=self.stop_ids
        )
        self.grammar = xgr.GrammarCompiler(info).compile_grammar(build_grammar(self.spec.json_schema, extract))
        self.text = instruction(self.spec, extract)

    def prompt(self, pages: int, texts: list[str] | None = None) -> str:
        """The prompt for a chunk of ``pages`` page images, or (OCR-only models) of the page ``texts`` they wrote."""
        from docpipe.model.load import chat_prompt

        if texts is None:
            return chat_prompt(self.m.processor, pages, self.text)
        pages_text = "\n\n".join(f"--- page {i} ---\n{text}" for i, text in enumerate(texts, 1))
        return chat_prompt(self.m.processor, 0, f"{self.text}\n\nThe document's text, page by page:\n\n{pages_text}")

    def __call__(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chunks are extracted batch_size to a generate() call (one grammar matcher per row), sorted by page
        count so a batch's prompts are of similar length. A batch that fails is retried chunk by chunk, so
        one document's failure stays in its own row."""
        from docpipe.ocr import decode_page

        todo = []
        for rec in records:
            if rec["kind"] != CHUNK or rec["status"] != "ok":
                continue
            try:
                if self.reader is not None:  # the page texts the OCR-only model writes stand for the images
                    todo.append((rec, self._read(rec), int(rec["doc_id"][:8], 16) + rec["chunk_index"]))
                    continue
                pixels = [decode_page(img, codec, w, h) for img, codec, w, h in
                          zip(rec["images"], rec["image_codecs"], rec["widths"], rec["heights"])]
                todo.append((rec, pixels, int(rec["doc_id"][:8], 16) + rec["chunk_index"]))
            except Exception as exc:
                if self.fail_fast:
                    raise
                rec.update(error_fields(ErrorType.model_error, describe(exc)))
        todo.sort(key=lambda item: len(item[1]))
        size = self.opts.batch_size
        for start in range(0, len(todo), size):
            self._extract_batch(todo[start : start + size])
        return records

    def _read(self, rec: dict[str, Any]) -> list[str]:
        """A chunk's pages read by the OCR-only model, as its OCR would; a page it fails on fails the chunk."""
        from docpipe.records import PAGE

        pages = [{"kind": PAGE, "status": "ok", "image": img, "image_codec": codec, "width": w, "height": h,
                  "page_number": n, "source_uri": rec.get("source_uri")}
                 for n, (img, codec, w, h) in enumerate(zip(rec["images"], rec["image_codecs"], rec["widths"],
                                                             rec["heights"]), 1)]
        read = sorted(self.reader(pages), key=lambda r: r["page_number"])
        failed = [r for r in read if r["status"] != "ok"]
        if failed:
            raise RuntimeError(f"page {failed[0]['page_number']} of the chunk could not be read: "
                               f"{failed[0].get('error_message')}")
        return [r["text"] for r in read]

    def _extract_batch(self, batch: list[tuple[dict[str, Any], list, int]]) -> None:
        try:
            firsts = self._attempts([pixels for _, pixels, _ in batch], temperature=None, seed=0)
        except Exception as exc:
            if self.fail_fast:
                raise
            if len(batch) == 1:
                batch[0][0].update(error_fields(ErrorType.model_error, describe(exc)))
                return
            for item in batch:
                self._extract_batch([item])
            return
        for (rec, pixels, seed), first in zip(batch, firsts):
            try:
                rec.update(self._with_retry(first, pixels, seed))
            except Exception as exc:  # the retry failed: this document's row only
                if self.fail_fast:
                    raise
                rec.update(error_fields(ErrorType.model_error, describe(exc)))

    def extract_one(self, pixels: list, seed: int) -> dict[str, Any]:
        """One chunk on its own: greedy first, then the retry if its output fails validation."""
        return self._with_retry(self._attempts([pixels], temperature=None, seed=seed)[0], pixels, seed)

    def _with_retry(self, result: dict[str, Any], pixels: list, seed: int) -> dict[str, Any]:
        """Output that fails validation gets one retry at a higher temperature."""
        attempts = 1
        if not result["valid"] and self.extract.retry_temperature > 0:
            [retry] = self._attempts([pixels], temperature=self.extract.retry_temperature, seed=seed)
            attempts = 2
            if retry["valid"] or not result["parsed"]:
                result = retry
        result["extraction_attempts"] = attempts
        return result

    def _attempts(self, pixels: list[list], temperature: float | None, seed: int) -> list[dict[str, Any]]:
        """One generate() call for several chunks (each its own page images), one grammar matcher per row."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from docpipe.ocr import model_inputs

        m = self.m
        device = m.device if self.opts.processor_device == "model" else "cpu"
        if self.reader is not None:  # page texts: a text prompt, no images
            inputs = model_inputs(m, [self.prompt(0, texts) for texts in pixels], None, device)
        else:
            inputs = model_inputs(m, [self.prompt(len(p)) for p in pixels], pixels, device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature else {"do_sample": False}
        if temperature:
            torch.manual_seed(seed)  # reproducible retries
        guard = RepetitionGuard(self.extract.max_repeat)
        grammar = GrammarProcessor(self.grammar, len(pixels), guard)
        with torch.inference_mode():
            out = m.model.generate(
                **inputs,
                max_new_tokens=self.extract.max_new_tokens,
                logits_processor=LogitsProcessorList([grammar]),
                stopping_criteria=StoppingCriteriaList([guard]),
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                **sampling,
            )
        return [self._result(tokens, row in guard.rows)
                for row, tokens in enumerate(out[:, inputs["input_ids"].shape[1] :].tolist())]

    def _result(self, tokens: list[int], repeated: bool) -> dict[str, Any]:
        m = self.m
        if repeated:  # what follows the guard's stop in a batch is padding
            tokens = tokens[: repetition_end(tokens, self.extract.max_repeat)]
        end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        text = m.processor.tokenizer.decode(tokens if end is None else tokens[:end], skip_special_tokens=True)
        finish = "stop" if end is not None else "repetition" if repeated else "length"
        parsed, errors = None, []
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            errors = [f"<output>: not complete JSON ({finish}): {exc}"]
        if parsed is not None:
            errors = self.spec.validate(parsed)
        return {
            "raw_output": text,
            "extraction": json.dumps(parsed, ensure_ascii=False, separators=(",", ":")) if parsed is not None else None,
            "parsed": parsed,
            "valid": parsed is not None and not errors,
            "validation_errors": errors,
            "extraction_finish_reason": finish,
            "output_tokens": len(tokens) if end is None else end + 1,
            "model": m.name,
        }


def load_extraction_model(opts: ModelOptions, extract: ExtractOptions):
    """The instruction-following model that turns an OCR-only model's text into JSON, loaded as the run's model is
    (its dtype, attention, quantization)."""
    from docpipe.config import DEFAULT_MODEL
    from docpipe.errors import ModelLoadError
    from docpipe.model.load import load_model

    name = extract.model or DEFAULT_MODEL
    try:
        loaded = load_model(ModelOptions(name=name, dtype=opts.dtype, attention=opts.attention,
                                         quantization=opts.quantization, batch_size=opts.batch_size,
                                         cpu_threads=opts.cpu_threads, processor_device=opts.processor_device,
                                         trust_remote_code=opts.trust_remote_code))
    except ModelLoadError as exc:  # say which model this is: the user may never have named it (the default)
        raise ModelLoadError(f"{opts.name} is OCR-only: its pages' text goes to the extraction model "
                             f"(--extract-model), {name!r}, which cannot be loaded: {exc}") from None
    if not loaded.family.follows_instructions:
        raise ModelLoadError(f"extraction model {name!r} is OCR-only too: give an instruction-following one "
                             "(--extract-model idefics2-8b, smolvlm-500m, ...)")
    return loaded
