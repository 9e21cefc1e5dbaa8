"""The GPU tier's helpers: no Ray, no PyMuPDF, no optional package. An offline GPU host with its own Python, torch,
transformers and pyarrow runs it with docpipe's small wheels copied in (pytest among them; docs/engines.md, "On an
offline GPU host"). Pages are drawn with Pillow; the tiny random Idefics2 is built locally by tests/conftest.py's
``tiny_checkpoint`` fixture (no download: HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import gc
import importlib.util
import io
from typing import Any

import pytest

NO_CUDA = "no CUDA device: the GPU tier runs on a GPU host (tests/gpu/)"

# shapes of several aspect ratios, so batches pad and the vision encoder sees more than one size
SHAPES = [(400, 520), (640, 300), (300, 300), (500, 700), (420, 600), (700, 500), (360, 480)]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def require(module: str, why: str) -> None:
    """Skip the calling test, with a reason, when an optional package is not installed."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: {why}")


def drawn_pages(n: int, edge_scale: float = 1.0) -> list[dict[str, Any]]:
    """``n`` page records as the render stage makes them (PNG bytes and their size), drawn with Pillow: each page
    has its own text, so the model sees distinct inputs. ``edge_scale`` scales every shape."""
    from PIL import Image, ImageDraw

    pages = []
    for i in range(n):
        w, h = SHAPES[i % len(SHAPES)]
        size = (int(w * edge_scale), int(h * edge_scale))
        img = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(img)
        for line in range(1 + i % 4):
            draw.text((20, 20 + 18 * line), f"page {i} line {line}: invoice {1000 + 7 * i} total {i * 13.5:.2f}",
                      fill="black")
        draw.rectangle((10 + i, size[1] // 2, size[0] // 2, size[1] // 2 + 10 + i), outline="black")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pages.append({"kind": "page", "status": "ok", "image": buf.getvalue(), "image_codec": "png",
                      "width": size[0], "height": size[1], "source_uri": f"drawn{i:02d}.png", "page_number": 1})
    return pages


def by_page(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {r["source_uri"]: [r["status"], r.get("text"), r.get("output_tokens"), r.get("finish_reason"),
                              r.get("error_message")] for r in rows}


def engine_texts(loaded, opts, pages: list[dict[str, Any]], encode_pages: int | None = None) -> dict[str, Any]:
    """Each page through generate alone (batch 1), then all pages through the continuous engine with ``opts``;
    the continuous engine's record, CUDA-graph choice and bank accounting, read before it is closed."""
    from docpipe.ocr import OcrStage

    alone = by_page(OcrStage(opts.model_copy(update={"engine": "generate", "batch_size": 1}), loaded=loaded)(
        [dict(p) for p in pages]))
    stage = OcrStage(opts.model_copy(update={"engine": "continuous"}), loaded=loaded)
    engine = stage.engine
    assert engine.name == "continuous", stage.engine_record
    if encode_pages:
        engine.encode_pages = encode_pages
    try:
        continuous = by_page(stage([dict(p) for p in pages]))
        manager = engine.manager  # None once the engine fell back to generate (the record then says so)
        graphs = None if manager is None else tuple(manager.continuous_batching_config.use_cuda_graph)
        info = {"record": stage.engine_record, "graphs": graphs,
                "capacity_pages": engine.capacity_pages, "peak_pages_in_flight": engine.peak_pages_in_flight,
                "pages_in_flight": engine.pages_in_flight, "free": list(engine._free), "bank_rows": engine.bank_rows}
    finally:
        engine.close()
    return {"generate": alone, "continuous": continuous, **info}


def free_cuda() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def load_tiny(tiny_checkpoint):
    """Loads the tiny random Idefics2 on the GPU with the given options; every model it loaded is let go of at the
    end of the module."""
    from docpipe.config import ModelOptions
    from docpipe.model.load import load_model

    loaded = []

    def load(**options):
        opts = ModelOptions(**{"name": "tiny-random", "max_new_tokens": 12, "do_image_splitting": True, **options})
        m = load_model(opts, str(tiny_checkpoint))
        loaded.append(m)
        return m, opts

    yield load
    loaded.clear()
    free_cuda()
