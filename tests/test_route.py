"""Text-layer routing and blank pages: the trust rules on real PDFs, blank detection on real renders, and runs
in which routed and blank pages never reach the model."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from docpipe.config import RenderOptions, RouteOptions, RunConfig
from docpipe.render.document import expand_document
from docpipe.render.route import TextLayer, is_blank, pymupdf_text_layer, trust_text_layer

AUTO = RouteOptions(text_layer="auto")
BODY = ("Invoice 2026-114 for services rendered in October. Consulting, 12 hours at 95.00 EUR per hour. "
        "Travel expenses as agreed. Payment is due within thirty days of the invoice date. ") * 3


def _save(doc, path: Path) -> Path:
    doc.save(path)
    return path


def _text_page(doc, **kwargs):
    page = doc.new_page(width=595, height=842)
    page.insert_textbox((72, 72, 523, 770), BODY, fontsize=11, **kwargs)
    return page


def _noisy_white(size=(1240, 1754), seed=3):
    """A white sheet as a scanner sees it: grain, a faint grey border and a few dust specks."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.clip(rng.normal(244, 9, (h, w)), 0, 255)
    arr[:, :6] = arr[:, -6:] = 200  # faint border at the sheet's edge
    arr[:5, :] = arr[-5:, :] = 200
    arr[40:42, 40:-40] = 215  # a faint frame line inside the margin
    for _ in range(6):  # dust: dark specks of 2-3 pixels
        y, x = rng.integers(100, h - 100), rng.integers(100, w - 100)
        arr[y : y + 3, x : x + 3] = 60
    return Image.fromarray(arr.astype("uint8")).convert("RGB")


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """PDFs whose layer must not be trusted, a scan with an OCR layer, and blank pages of every kind."""
    import pymupdf
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("route")
    paths = {}

    # A font without a Unicode map: PyMuPDF embeds it as Type0/Identity-H; dropping ToUnicode leaves glyph ids.
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_font(fontname="F0", fontbuffer=pymupdf.Font("tiro").buffer)
    page.insert_textbox((72, 72, 523, 770), BODY, fontsize=11, fontname="F0")
    for xref in range(1, doc.xref_length()):
        if doc.xref_get_key(xref, "ToUnicode")[0] == "xref":
            doc.xref_set_key(xref, "ToUnicode", "null")
    paths["garbage"] = _save(doc, folder / "garbage.pdf")

    # White text over a picture of other text: the layer says one thing, the reader sees another.
    src = pymupdf.open()
    src.new_page(width=400, height=300).insert_textbox((20, 20, 380, 280), "Purchase order 77. " * 12, fontsize=12)
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_image((72, 72, 523, 420), stream=src[0].get_pixmap(dpi=100).tobytes("png"))
    page.insert_textbox((72, 430, 523, 770), BODY, fontsize=11, color=(1, 1, 1))
    paths["white"] = _save(doc, folder / "white.pdf")

    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_textbox((700, 72, 1200, 770), BODY, fontsize=11)  # right of the page: MuPDF clips it away
    page.insert_text((72, 72), "Visible title", fontsize=14)
    paths["outside"] = _save(doc, folder / "outside.pdf")

    # A scan: one full-page image, with the OCR text on top in render mode 3 (invisible), as scanners write it.
    paths["scan_ocr"] = folder / "scan_ocr.pdf"
    paths["scan_ocr"].write_bytes(_scan(0, visible_text=False, dpi=100))

    # Blank pages of every kind: an empty PDF page (between two text pages), a noisy white scan as PNG and
    # inside a PDF, an empty (uniform) image, and a uniformly black one.
    doc = pymupdf.open()
    _text_page(doc)
    doc.new_page(width=595, height=842)
    _text_page(doc)
    paths["with_blank"] = _save(doc, folder / "with_blank.pdf")
    noisy = _noisy_white()
    (folder / "noisy_white.png").write_bytes(_png(noisy))
    paths["noisy_white_png"] = folder / "noisy_white.png"
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_image(page.rect, stream=_png(noisy))
    paths["noisy_white_pdf"] = _save(doc, folder / "noisy_white_scan.pdf")
    Image.new("RGB", (800, 600), "white").save(folder / "empty.png")
    paths["empty_png"] = folder / "empty.png"
    Image.new("L", (300, 200), 0).save(folder / "black.png")
    paths["black_png"] = folder / "black.png"

    # Not blank: the same noisy sheet with one short line of text on it.
    word = noisy.copy()
    ImageDraw.Draw(word).text((500, 800), "Total 42.00", fill=(20, 20, 20), font_size=24)
    word.save(folder / "one_line.png")
    paths["one_line_png"] = folder / "one_line.png"
    return paths


def _pages(path: Path, route: RouteOptions, **kwargs) -> list[dict]:
    return [r for r in expand_document(str(path), RenderOptions(), 980, route=route, **kwargs) if r["kind"] == "page"]


def _markdown(path: Path, number: int) -> str:
    """The page's text layer as Markdown, with the document's running lines found as the render stage finds them."""
    import pymupdf

    from docpipe.render.text_layer import RunningLines, clean_text, page_markdown

    doc = pymupdf.open(path)
    return clean_text(page_markdown(doc[number - 1], running=RunningLines(doc)))


def test_born_digital_samples_take_their_text_layer(sample_docs, tmp_path):
    """Demo PDFs and the bench corpus go to the text layer as Markdown (the corpus's two columns stay whole, its
ruled table is a table); images go to the model."""
    from docpipe.tools.corpus import make_bench_corpus

    corpus = make_bench_corpus(tmp_path, pages=4, pages_per_doc=2)
    pdfs = sorted(sample_docs.glob("*.pdf"))
    routed = 0
    for path in pdfs + corpus:
        if path.name == "corrupt.pdf":
            continue
        for rec in _pages(path, AUTO):
            assert (rec["text_source"], rec["route_reason"]) == ("text_layer", "trusted"), \
                (path.name, rec["page_number"])
            assert rec["text"] == _markdown(path, rec["page_number"])
            assert "image" not in rec and rec["width"] > 0 and rec["renderer"] == "pymupdf"
            routed += 1
    assert routed == 5 + 4  # report.pdf 3, minutes.pdf 2, corpus 4
    report = _pages(sample_docs / "report.pdf", AUTO)[0]["text"]
    assert report.startswith("# Operations report\n\nQuarterly operations report. Shipments rose")
    assert "| Region | Q1 | Q2 | Q3 |\n|---|---|---|---|\n| North | 120 | 135 | 150 |" in report
    page = _pages(corpus[0], AUTO)[0]["text"]
    assert page.startswith("# Annual operations review, section 1\n\n") and page.count("\n|---|---|---|---|---|\n") == 1
    for name in ("scan.jpg", "receipt.png", "fax.tiff"):
        for rec in _pages(sample_docs / name, AUTO):
            assert rec.get("text_source") is None and rec["image"] and rec.get("text") is None, name
            assert rec["route_reason"] == "no_text_layer"


def test_auto_is_the_default_and_never_sends_text_pages_to_the_model(sample_docs):
    assert RunConfig(output="x").route.text_layer == "auto"
    recs = _pages(sample_docs / "report.pdf", RouteOptions(text_layer="never"))
    assert [r.get("text_source") for r in recs] == [None, None, None] and all(r["image"] for r in recs)
    assert [r["route_reason"] for r in recs] == ["text_layer_never"] * 3


@pytest.mark.parametrize("name, reason", [("garbage", "unmapped_font"), ("white", "hidden_text"),
                                          ("outside", "sparse"), ("scan_ocr", "full_page_image")])
def test_untrustworthy_layers_go_to_the_model(docs, name, reason):
    import pymupdf

    layer = pymupdf_text_layer(pymupdf.open(docs[name])[0])
    assert trust_text_layer(layer, AUTO).reason == reason
    [rec] = _pages(docs[name], AUTO)
    assert rec.get("text_source") is None and rec["image"] and rec["route_reason"] == reason


def test_garbage_text_is_also_caught_by_its_characters(docs):
    """Without the font check, the glyph-id text still fails: its spaces and digits come out as controls."""
    import pymupdf

    layer = pymupdf_text_layer(pymupdf.open(docs["garbage"])[0])
    assert layer.unmapped_fonts == 1 and layer.bad_chars / layer.chars > 0.1
    relaxed = TextLayer(**{**layer.__dict__, "unmapped_fonts": 0})
    assert trust_text_layer(relaxed, AUTO).reason == "bad_chars"


def test_an_ocr_layer_is_trusted_only_when_asked(docs):
    import pymupdf

    trusting = RouteOptions(text_layer="auto", trust_ocr_layer=True)
    layer = pymupdf_text_layer(pymupdf.open(docs["scan_ocr"])[0])
    assert layer.image_coverage > 0.99 and layer.invisible_chars == layer.chars > 400
    [rec] = _pages(docs["scan_ocr"], trusting)
    assert rec["text_source"] == "text_layer" and rec["text"].startswith("Invoice 2026-114 for services")


def test_rules_by_numbers():
    base = TextLayer(text="x", width_pt=612, height_pt=792, chars=1000, hidden_chars=0, invisible_chars=0,
                     bad_chars=0, unmapped_fonts=0, image_coverage=0.1)

    def reason(**change):
        return trust_text_layer(TextLayer(**{**base.__dict__, **change}), AUTO).reason

    assert reason() == "trusted"
    assert reason(chars=46) == "sparse" and reason(chars=47) == "trusted"  # 0.5 per in2 of a letter page: 46.75
    assert reason(width_pt=100, height_pt=100, chars=19) == "sparse"  # min_chars 20 on a small page
    assert reason(bad_chars=10) == "trusted" and reason(bad_chars=11) == "bad_chars"  # 1 %
    assert reason(hidden_chars=20) == "trusted" and reason(hidden_chars=21) == "hidden_text"  # 2 %
    assert reason(invisible_chars=21) == "hidden_text"
    assert reason(image_coverage=0.9) == "full_page_image"
    assert trust_text_layer(None, AUTO).reason == "no_text_layer"


def test_blank_pages_of_every_kind(docs):
    """White PDF page, noisy white scan (PNG and PDF), empty image, black image: blank, empty text, no image.
    A short line of text on the same noisy sheet is not blank."""
    recs = _pages(docs["with_blank"], AUTO)
    assert [r["text_source"] for r in recs] == ["text_layer", "blank", "text_layer"]
    assert recs[1]["text"] == "" and "image" not in recs[1]
    for name in ("noisy_white_png", "noisy_white_pdf", "empty_png", "black_png"):
        for route in (AUTO, RouteOptions(text_layer="never")):  # blank detection does not depend on the text layer
            [rec] = _pages(docs[name], route)
            assert (rec["text_source"], rec["text"], rec.get("image")) == ("blank", "", None), name
    [rec] = _pages(docs["one_line_png"], AUTO)
    assert rec.get("text_source") is None and rec["image"]
    [rec] = _pages(docs["noisy_white_png"], RouteOptions(skip_blank=False))
    assert rec.get("text_source") is None and rec["image"]


def test_blank_detection_on_arrays():
    import numpy as np

    opts = RouteOptions()
    rng = np.random.default_rng(0)
    noise = np.clip(rng.normal(235, 25, (1000, 700, 3)), 0, 255).astype("uint8")  # heavy grain
    assert is_blank(noise, opts)
    assert is_blank(np.zeros((1, 1, 3), "uint8"), opts)
    dark_edge = np.full((1000, 700, 3), 250, "uint8")
    dark_edge[:, :20] = 0  # a scanner's black edge, inside the ignored margin
    assert is_blank(dark_edge, opts)
    text = dark_edge.copy()
    text[500:520, 300:400] = 0  # one word-sized dark patch
    assert not is_blank(text, opts)


def test_extraction_chunks_keep_routed_pages_images(sample_docs):
    recs = list(expand_document(str(sample_docs / "report.pdf"), RenderOptions(), 980, route=AUTO, chunk_pages=8))
    pages = [r for r in recs if r["kind"] == "page"]
    [chunk] = [r for r in recs if r["kind"] == "chunk"]
    assert all(p["text_source"] == "text_layer" and "image" not in p for p in pages)
    assert len(chunk["images"]) == 3 and all(chunk["images"])


def test_routed_and_blank_pages_never_reach_the_model(sample_docs, docs, tiny_checkpoint, tmp_path, monkeypatch):
    """A mixed run (local executor): the model generates for exactly the pages that need it, the rows keep the
    contract (one per page, one per document), the counts by source reach the manifest and summary, and a
    second run resumes."""
    import pyarrow.parquet as pq

    from docpipe.cli import print_summary
    from docpipe.ocr import OcrStage
    from docpipe.execute.run import run

    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in [*sample_docs.iterdir(), *docs.values()]:
        (inputs / path.name).write_bytes(path.read_bytes())
    generated: list[tuple[str, int]] = []
    original = OcrStage._generate

    def counting(self, batch, forced=False):
        generated.extend((Path(r["source_uri"]).name, r["page_number"]) for r in batch)
        assert all(r["_pixels"] is not None for r in batch)
        return original(self, batch, forced)

    monkeypatch.setattr(OcrStage, "_generate", counting)
    config = RunConfig(inputs=[str(inputs)], output=str(tmp_path / "out"), executor="local",
                       route=RouteOptions(text_layer="auto"),
                       model={"name": "tiny-random", "max_new_tokens": 4, "do_image_splitting": False})
    result = run(config)
    pages = pq.read_table(tmp_path / "out" / "pages").to_pylist()
    source = {(Path(p["source_uri"]).name, p["page_number"]): p["text_source"] for p in pages}
    model_pages = sorted(k for k, v in source.items() if v == "model")
    assert sorted(generated) == model_pages
    assert model_pages == sorted([("fax.tiff", 1), ("fax.tiff", 2), ("garbage.pdf", 1), ("one_line.png", 1),
                                  ("outside.pdf", 1), ("receipt.png", 1), ("scan.jpg", 1), ("scan_ocr.pdf", 1),
                                  ("white.pdf", 1)])
    blank = sorted(k for k, v in source.items() if v == "blank")
    assert blank == [("black.png", 1), ("empty.png", 1), ("noisy_white.png", 1), ("noisy_white_scan.pdf", 1),
                     ("with_blank.pdf", 2)]
    assert all(p["text"] == "" for p in pages if p["text_source"] == "blank")
    routed = [p for p in pages if p["text_source"] == "text_layer"]
    assert len(routed) == 7 and all(p["model"] is None and p["output_tokens"] is None for p in routed)
    # contract: one row per page and per document; the corrupt file is an error row, not a page
    assert len(pages) == len(source) == 21
    docs_rows = pq.read_table(tmp_path / "out" / "documents").to_pylist()
    assert len(docs_rows) == 16 and sum(d["status"] == "ok" for d in docs_rows) == 15
    counters = result.manifest.counters
    assert (counters["pages_model"], counters["pages_text_layer"], counters["pages_blank"]) == (9, 7, 5)
    manifest = json.loads((tmp_path / "out" / "_runs" / f"{result.manifest.run_id}.json").read_text())
    assert manifest["counters"]["pages_text_layer"] == 7
    out = io.StringIO()
    print_summary(result, out)
    assert "text from  model 9, text_layer 7, blank 5" in out.getvalue()

    generated.clear()
    again = run(config)
    # nothing new: no row, nothing read; the corrupt file failed for good and is not retried either
    assert generated == [] and again.manifest.documents == {"total": 0}
    assert (again.manifest.counters["skipped_unchanged_listing"], again.manifest.counters["skipped_failed_unchanged"],
            again.manifest.counters["documents_read"]) == (15, 1, 0)


def test_mixed_run_through_ray_keeps_the_contract(sample_docs, docs, tmp_path, local_job):
    """The same mixed input through the CLI: rows match the contract, counts by source add up. On the local
    executor (routing is the render stage's, the same code in a Ray task); routed pages through Ray Data are
    tests/test_s3.py's Ray run and tests/test_fidelity.py's contract run."""
    import pyarrow.parquet as pq

    from docpipe.schemas import FURNITURE, PAGES_SCHEMA, PageRow
    from tests.conftest import run_cli

    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in [sample_docs / "report.pdf", sample_docs / "scan.jpg", docs["with_blank"], docs["garbage"]]:
        (inputs / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    proc = run_cli("run", inputs, "--output", out, "--model", "tiny-random", "--max-new-tokens", "4",
                   "--no-image-splitting", "--no-progress", "--text-layer", "auto", "--config", local_job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out / "pages").drop_columns(["ingest_date"])
    assert table.schema.remove_metadata() == PAGES_SCHEMA.remove_metadata()
    pages = [PageRow(**r) for r in table.to_pylist()]
    source = sorted((Path(p.source_uri).name, p.page_number, p.text_source) for p in pages)
    assert source == [("garbage.pdf", 1, "model"), ("report.pdf", 1, "text_layer"), ("report.pdf", 2, "text_layer"),
                      ("report.pdf", 3, "text_layer"), ("scan.jpg", 1, "model"), ("with_blank.pdf", 1, "text_layer"),
                      ("with_blank.pdf", 2, "blank"), ("with_blank.pdf", 3, "text_layer")]
    assert all(p.status == "ok" and (p.model is not None) == (p.text_source == "model") for p in pages)
    assert "text from  model 2, text_layer 5, blank 1" in proc.stdout
    # text-layer pages carry their blocks to the sink: in reading order, furniture out of the text
    for p in pages:
        if p.text_source == "text_layer":
            assert p.blocks and p.text_layer_analysis in ("fast", "layout")
            assert p.text == "\n\n".join(b.text for b in p.blocks if b.kind not in FURNITURE and b.text)
        else:
            assert p.text_layer_analysis is None and p.blocks == ([] if p.text_source == "blank" else None)
    first = next(p for p in pages if p.source_uri.endswith("report.pdf") and p.page_number == 1)
    assert [b.kind for b in first.blocks] == ["heading", "paragraph", "table"] and first.text_layer_analysis == "layout"
    assert first.blocks[0].text == "# Operations report" and 0 < first.blocks[0].y0 < first.blocks[2].y0 < 1


def test_a_text_layer_that_cannot_be_read_sends_the_page_to_the_model(sample_docs):
    from docpipe.render.document import _route
    from docpipe.render.pixels import render_image

    class Broken:
        def text_layer(self):
            raise RuntimeError("MuPDF: syntax error in content stream")

    from PIL import Image

    with Image.open(sample_docs / "receipt.png") as img:
        rendered = render_image(img, RenderOptions(), 980)
    assert _route(Broken(), rendered, AUTO) == {"route_reason": "text_layer_error"}


def _scan(rotation: int, visible_text: bool, dpi: int = 60) -> bytes:
    """A full-page scan of BODY (as rendered by MuPDF) on an A4 page turned by /Rotate, with a text layer on top:
    a visible wrong one (another invoice's text), or the scanner's invisible OCR layer."""
    import pymupdf

    src = pymupdf.open()
    _text_page(src)
    pix = src[0].get_pixmap(dpi=dpi)
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_image(page.rect, stream=pix.tobytes("png"))
    if visible_text:
        page.insert_textbox((72, 72, 523, 770), BODY.replace("2026-114", "9999-999"), fontsize=11)
    else:
        page.insert_textbox((72, 72, 523, 770), BODY, fontsize=11, render_mode=3)
    page.set_rotation(rotation)
    return doc.tobytes()


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_rotated_full_page_scans_are_full_page_images(rotation, tmp_path):
    """Image coverage is measured in the page's own frame, whatever its /Rotate (MuPDF measured a rotated A4
    scan at 0.71): a wrong visible layer over it is not trusted, its OCR layer is when asked."""
    import pymupdf

    from docpipe.render.pdfium import PdfiumPage, open_pdfium

    wrong = tmp_path / "wrong.pdf"
    wrong.write_bytes(_scan(rotation, visible_text=True))
    pdfium_page = PdfiumPage(open_pdfium(wrong.read_bytes()), 0)
    for layer in (pymupdf_text_layer(pymupdf.open(wrong)[0]), pdfium_page.text_layer()):
        assert layer.image_coverage > 0.99
        assert trust_text_layer(layer, AUTO).reason == "full_page_image"
    [rec] = _pages(wrong, AUTO)
    assert rec.get("text_source") is None and rec["image"]

    ocr = tmp_path / "ocr.pdf"
    ocr.write_bytes(_scan(rotation, visible_text=False))
    [rec] = _pages(ocr, RouteOptions(text_layer="auto", trust_ocr_layer=True))
    assert rec["text_source"] == "text_layer" and rec["text"].startswith("Invoice 2026-114 for services")


def test_pdfium_pages_measure_their_images(rendered_logo_page):
    """PDFium's view of a page with a small logo over a good text layer: the logo's share of the page, and the
    layer is trusted (the pinned pypdfium2 has get_bounds, not get_pos: every such page went to the model)."""
    from docpipe.render.document import _route
    from docpipe.render.pdfium import PdfiumPage, open_pdfium

    data, logo_share = rendered_logo_page
    page = PdfiumPage(open_pdfium(data), 0)
    layer = page.text_layer()
    assert layer.image_coverage == pytest.approx(logo_share, rel=0.01)
    assert trust_text_layer(layer, AUTO).trusted
    rendered = page(RenderOptions(), 490)
    routed = _route(page, rendered, AUTO)
    assert routed["text_source"] == "text_layer" and routed["text"].startswith("Invoice 2026-114")


@pytest.fixture
def rendered_logo_page():
    import pymupdf
    from PIL import Image

    doc = pymupdf.open()
    page = _text_page(doc)
    buf = io.BytesIO()
    Image.new("RGB", (100, 50), "navy").save(buf, "PNG")
    page.insert_image((400, 20, 500, 70), stream=buf.getvalue())  # a 100 x 50 pt logo in the top margin
    return doc.tobytes(), 100 * 50 / (595 * 842)


def test_a_converter_failure_sends_the_page_to_the_model_and_our_routing_bugs_still_surface(monkeypatch, tmp_path):
    import pymupdf

    import docpipe.render.route
    import docpipe.render.text_layer
    from docpipe.render.document import expand_document

    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_textbox((72, 72, 523, 770), BODY, fontsize=11)
    doc.save(tmp_path / "odd.pdf")

    def pages():
        return [r for r in expand_document(str(tmp_path / "odd.pdf"), RenderOptions(), 600, route=AUTO)
                if r["kind"] == "page"]

    def third_party_failure(*args, **kwargs):
        raise TypeError("'NoneType' object is not subscriptable")  # as a layout library fails on an odd page

    monkeypatch.setattr(docpipe.render.text_layer, "page_markdown", third_party_failure)
    [row] = pages()
    assert (row["status"], row["route_reason"], row.get("text_source")) == ("ok", "text_layer_error", None)
    assert row["image"]
    monkeypatch.undo()

    monkeypatch.setattr(docpipe.render.route, "_unmapped_fonts", third_party_failure)  # a mistake in routing proper
    [row] = pages()
    assert (row["status"], row["error_type"]) == ("error", "render_error")
    assert "NoneType" in row["error_message"]


def test_a_routed_page_carries_the_text_the_test_wrote_into_the_pdf(tmp_path):
    """The reference is what this test wrote into the PDF (a title, a paragraph and a ruled table), not a second
    call of the converter under test: the routed page's text is that, as Markdown, word for word."""
    import pymupdf

    written = [
        ("Ledger of shipments", "Shipment 4471 left Rotterdam on 3 March with 18 pallets of copper wire. The carrier "
         "confirmed arrival in Hamburg two days later, and the invoice was settled in full.",
         [["Port", "Pallets", "Days"], ["Rotterdam", "18", "2"], ["Antwerp", "7", "3"]]),
        ("Minutes of the board", "The board met on Tuesday. Present were Ada, Brook and Chen. The budget for 2027 "
         "was approved with one abstention, and the audit committee will report in June.", None),
    ]
    doc = pymupdf.open()
    for title, body, table in written:
        page = doc.new_page(width=595, height=842)
        page.insert_text((72, 90), title, fontsize=20)
        page.insert_textbox((72, 110, 523, 300), body, fontsize=11)
        for r, row in enumerate(table or []):
            for c, cell in enumerate(row):
                rect = (72 + c * 110, 320 + r * 24, 72 + (c + 1) * 110, 320 + (r + 1) * 24)
                page.draw_rect(rect, color=(0, 0, 0), width=0.8)
                page.insert_text((rect[0] + 6, rect[1] + 16), cell, fontsize=11)
    path = _save(doc, tmp_path / "written.pdf")
    recs = _pages(path, AUTO)
    assert [(r["page_number"], r["text_source"], r["route_reason"]) for r in recs] == [
        (1, "text_layer", "trusted"), (2, "text_layer", "trusted")]
    for rec, (title, body, table) in zip(recs, written):
        expected = f"# {title}\n\n{body}"
        if table:
            rows = ["| " + " | ".join(row) + " |" for row in table]
            expected += "\n\n" + "\n".join([rows[0], "|---|---|---|", *rows[1:]])
        assert rec["text"] == expected, rec["page_number"]
