"""The OCR stage: page records with images in, page records with the model's text out.

The stage is a plain callable over a list of records; it doesn't know whether it runs in
a loop, a Ray task or a GPU actor. Records it isn't meant to touch (document records,
pages that already failed) pass through unchanged.
"""

from __future__ import annotations

import io
from typing import Any

from pipeline.config import ModelOptions
from pipeline.errors import describe
from pipeline.model import LoadedModel, load_model
from pipeline.records import PAGE


class OcrStage:
    def __init__(self, opts: ModelOptions, checkpoint: str | None = None, loaded: LoadedModel | None = None):
        self.opts = opts
        self.m = loaded or load_model(opts, checkpoint)
        tokenizer = self.m.processor.tokenizer
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": opts.prompt}]}]
        self.prompt = self.m.processor.apply_chat_template(messages, add_generation_prompt=True)
        stop = self.m.model.generation_config.eos_token_id
        stop = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
        eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        if isinstance(eou, int) and eou != tokenizer.unk_token_id:
            stop.add(eou)  # Idefics2 ends its turns with <end_of_utterance>
        stop.add(tokenizer.eos_token_id)
        self.stop_ids = sorted(i for i in stop if i is not None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    def __call__(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out, todo = [], []
        for rec in records:
            rec = {k: v for k, v in rec.items() if k != "image"} | {"_image": rec.get("image")}
            if rec["kind"] == PAGE and rec["status"] == "ok":
                try:
                    rec["_pil"] = _decode(rec["_image"])
                    todo.append(rec)
                    continue
                except Exception as exc:
                    rec.update(status="error", error_type="image_decode_error", error_message=describe(exc))
            out.append(rec)
        self._generate_resilient(todo)
        for rec in out + todo:
            rec.pop("_image", None)
            rec.pop("_pil", None)
        return out + todo

    def _generate_resilient(self, batch: list[dict[str, Any]]) -> None:
        """Generate for ``batch`` in place; on failure retry in halves, so only a failing page is marked."""
        if not batch:
            return
        try:
            self._generate(batch)
        except Exception as exc:
            _free_cuda_cache()
            if len(batch) == 1:
                batch[0].update(status="error", error_type="model_error", error_message=describe(exc))
                return
            half = len(batch) // 2
            self._generate_resilient(batch[:half])
            self._generate_resilient(batch[half:])

    def _generate(self, batch: list[dict[str, Any]]) -> None:
        import torch

        m = self.m
        inputs = m.processor(
            text=[self.prompt] * len(batch),
            images=[[rec["_pil"]] for rec in batch],
            padding=True,
            return_tensors="pt",
        )
        inputs = {k: v.to(m.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(m.dtype)
        with torch.inference_mode():
            generated = m.model.generate(
                **inputs,
                max_new_tokens=self.opts.max_new_tokens,
                do_sample=False,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
            )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :].tolist()
        for rec, tokens in zip(batch, new_tokens):
            end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
            kept = tokens if end is None else tokens[:end]
            rec.update(
                text=m.processor.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                output_tokens=len(tokens) if end is None else end + 1,
                finish_reason="length" if end is None else "stop",
                model=m.name,
            )


def _decode(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
