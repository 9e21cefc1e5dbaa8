"""The continuous engine against generate, page by page, in one process: the check that must hold on every
transformers release pyproject.toml admits. Run in-process at the pinned release (tests/test_engines.py) and as
``python -m tests.engine_equality`` under the floor release (PYTHONPATH=.venv-floor), where it prints its result
as one JSON line.

Five drawn pages of four shapes, split into 5 crops each (the per-page split of image features is what changed
across releases), encoded two pages per vision call (a chunk boundary inside a batch of four)."""

from __future__ import annotations

import io
import json


def drawn_pages() -> list[dict]:
    from PIL import Image, ImageDraw

    pages = []
    for i, size in enumerate([(400, 520), (640, 300), (300, 300), (500, 700), (420, 600)]):
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).text((20, 20), f"page {i}: totals and balances " * 2, fill="black")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pages.append({"kind": "page", "status": "ok", "image": buf.getvalue(), "image_codec": "png",
                      "width": size[0], "height": size[1], "source_uri": f"page{i}.png", "page_number": 1})
    return pages


def compare(loaded=None, max_new_tokens: int = 12, attentions: tuple[str, ...] = ("auto",)) -> dict:
    """Each page's (text, output_tokens, finish_reason) from generate alone and from the continuous engine, once per
    ``engine_attention`` in ``attentions`` (``varlen`` on a CPU: torch's varlen path with its reference computation,
    in the paged form: block tables and cache writes, as the pinned torch runs it on a GPU). With one, the result
    is that run's; with several, ``runs`` holds each."""
    import transformers

    from docpipe.config import ModelOptions
    from docpipe.model.load import load_model
    from docpipe.ocr import OcrStage
    from docpipe.model.tiny import ensure_tiny_checkpoint

    opts = ModelOptions(name="tiny-random", max_new_tokens=max_new_tokens, do_image_splitting=True)
    loaded = loaded or load_model(opts, str(ensure_tiny_checkpoint()))
    pages = drawn_pages()

    def key(rows):
        return {r["source_uri"]: [r["status"], r.get("text"), r.get("output_tokens"), r.get("finish_reason"),
                                  r.get("error_message")] for r in rows}

    alone = key(OcrStage(opts.model_copy(update={"engine": "generate", "batch_size": 1}), loaded=loaded)(
        [dict(p) for p in pages]))
    runs = {}
    for attention in attentions:
        with _gathered(attention == "varlen-gathered"):
            stage = OcrStage(opts.model_copy(update={"engine": "continuous", "batch_size": 4,
                                                     "engine_attention": attention.removesuffix("-gathered")}),
                             loaded=loaded)
        stage.engine.encode_pages = 2
        window = stage.engine.lm.config.sliding_window  # the decoding shell's
        try:
            continuous = key(stage([dict(p) for p in pages]))
        finally:
            stage.engine.close()
        runs[attention] = {"record": stage.engine_record, "shell_sliding_window": window, "continuous": continuous,
                           "shell_attention_after": stage.engine.lm.config._attn_implementation,
                           # every forward of the loop waits for the stream that made its inputs (a no-op on a CPU)
                           "forward_ordered": stage.engine.ordered}
    return {"transformers": transformers.__version__, "generate": alone, "runs": runs, **runs[attentions[0]]}


class _gathered:
    """``varlen-gathered``: the varlen path's reference in its gathered form (transformers' gathered copy of the
    cache, what torch 2.10-2.11 run on a GPU) instead of the paged one."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        from docpipe.model import attention

        self.module, self.saved = attention, attention.reference_kernel
        if self.on:
            attention.reference_kernel = lambda paged, page_size=256: self.saved(False, page_size)

    def __exit__(self, *exc):
        self.module.reference_kernel = self.saved


if __name__ == "__main__":  # the floor's run (tests/test_engines.py): transformers' packed sdpa and torch's varlen path
    print(json.dumps(compare(attentions=("sdpa", "varlen"))))
