"""docpipe's stages on a Ray Dataset the user built (issue 31): read_binary_files over a folder, then the processor's
render (and route) and model steps, in the style of ray.data.llm. One small Ray-tier test."""

from __future__ import annotations

import pymupdf
import pytest
from PIL import Image, ImageDraw

TEXTS = ["Board minutes page 1: the committee approved the budget for the coming year in full.",
         "Board minutes page 2: the auditors reported no findings, and the meeting closed at noon."]


@pytest.mark.ray
def test_a_users_ray_dataset_through_docpipes_stages(tmp_path):
    import ray

    import docpipe

    doc = pymupdf.open()
    for text in TEXTS:
        doc.new_page().insert_text((72, 72), text)
    doc.save(tmp_path / "minutes.pdf")
    image = Image.new("RGB", (400, 300), "white")
    ImageDraw.Draw(image).ellipse((60, 60, 340, 240), outline="black", width=8)
    image.save(tmp_path / "photo.png")
    (tmp_path / "empty.pdf").write_bytes(b"")

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        processor = docpipe.build_processor({"model": {"name": "tiny-random", "max_new_tokens": 3}, "num_cpus": 0.5,
                                             "actor_memory_gb": 1},
                                            postprocess=lambda row: {**row, "name": row["source_uri"].rsplit("/")[-1]})
        ds = ray.data.read_binary_files(str(tmp_path), include_paths=True)  # the user's own Dataset: bytes, path
        rows = processor(ds).take_all()
    finally:
        ray.shutdown()
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    documents = {r["name"]: r for r in by_kind["document"]}
    assert {k: (d["status"], d["error_type"], d["page_count"]) for k, d in documents.items()} == {
        "empty.pdf": ("error", "empty_file", None), "minutes.pdf": ("ok", None, 2), "photo.png": ("ok", None, 1)}
    pages = sorted((r["name"], r["page_number"], r["text_source"], r["route_reason"], r["text"])
                   for r in by_kind["page"])
    assert pages[:2] == [("minutes.pdf", 1, "text_layer", "trusted", TEXTS[0]),
                         ("minutes.pdf", 2, "text_layer", "trusted", TEXTS[1])]
    (name, number, source, reason, text), = pages[2:]
    assert (name, number, source, reason) == ("photo.png", 1, "model", "no_text_layer") and text  # the model's words
    assert set(by_kind) == {"document", "page"} and "actor_engine" not in rows[0]
