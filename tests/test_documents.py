import hashlib

import pymupdf
import pytest
from PIL import Image

from docpipe.config import RenderOptions
from docpipe.render.document import expand_document, sniff_media_type
from docpipe.errors import InputError
from docpipe.sources import list_inputs

OPTS = RenderOptions()


def page_pil(rec):
    """A page record's image, decoded the way the model stage decodes it."""
    from docpipe.ocr import decode_page

    pixels = decode_page(rec["image"], rec["image_codec"], rec["width"], rec["height"])
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def expand(path, edge=1960, opts=OPTS):
    recs = list(expand_document(str(path), opts, edge))
    return recs[0], recs[1:]


def test_pdf_expands_to_one_record_per_page_at_the_target_size(sample_docs):
    path = sample_docs / "report.pdf"
    doc, pages = expand(path)
    expected = pymupdf.open(path).page_count
    assert doc["status"] == "ok" and doc["page_count"] == expected == 3
    assert doc["doc_id"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert doc["media_type"] == "application/pdf"
    assert [p["page_number"] for p in pages] == [1, 2, 3]
    for p in pages:
        assert p["image_codec"] == "rgb8+zstd" and len(p["image"]) < 2_000_000
        img = page_pil(p)
        assert img.mode == "RGB" and max(img.size) == 1960 == max(p["width"], p["height"])
        assert (img.width, img.height) == (p["width"], p["height"])


def test_pages_are_rendered_lazily(sample_docs, monkeypatch):
    import docpipe.render.open

    rendered = []
    real = docpipe.render.open.render_pdf_page
    monkeypatch.setattr(docpipe.render.open, "render_pdf_page",
                        lambda page, *a: rendered.append(page.number + 1) or real(page, *a))
    gen = expand_document(str(sample_docs / "report.pdf"), OPTS, 1960)
    assert next(gen)["kind"] == "document" and rendered == []  # opened, nothing rendered yet
    assert next(gen)["page_number"] == 1
    assert rendered == [1]  # page 1 is out before pages 2 and 3 are rendered
    assert [r["page_number"] for r in gen] == [2, 3] and rendered == [1, 2, 3]


def test_multipage_tiff_frames_become_pages(sample_docs):
    doc, pages = expand(sample_docs / "fax.tiff")
    assert doc["media_type"] == "image/tiff" and doc["page_count"] == 2 == len(pages)
    assert all(p["status"] == "ok" for p in pages)


def test_images_are_never_enlarged(sample_docs):
    doc, [page] = expand(sample_docs / "receipt.png")
    assert (page["width"], page["height"]) == Image.open(sample_docs / "receipt.png").size


@pytest.mark.parametrize(
    "name,data,error_type",
    [
        ("empty.pdf", b"", "empty_file"),
        ("noise.pdf", b"\x00garbage" * 100, "unsupported_media_type"),
        ("notes.txt", b"just some text\n", "unsupported_media_type"),
        ("broken.pdf", b"%PDF-1.7\n" + b"\x00" * 50, "corrupt_document"),
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "corrupt_document"),
        ("nopages.pdf", None, "empty_document"),  # a well-formed PDF with an empty page tree
    ],
)
def test_bad_documents_become_error_records(tmp_path, name, data, error_type):
    if data is None:
        import io

        import pypdfium2

        buf = io.BytesIO()
        pypdfium2.PdfDocument.new().save(buf)
        data = buf.getvalue()
    path = tmp_path / name
    path.write_bytes(data)
    doc, pages = expand(path)
    assert pages == []
    assert doc["status"] == "error" and doc["error_type"] == error_type and doc["error_message"]
    assert doc["size_bytes"] == len(data)


def test_encrypted_pdf_is_an_error_record(tmp_path):
    pdf = pymupdf.open()
    pdf.new_page().insert_text((72, 72), "secret")
    path = tmp_path / "locked.pdf"
    pdf.save(path, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="owner")
    doc, pages = expand(path)
    assert (doc["status"], doc["error_type"], pages) == ("error", "encrypted_document", [])


def test_pixel_cap_shrinks_huge_pages(tmp_path):
    pdf = pymupdf.open()
    pdf.new_page(width=14400, height=14400)  # 200 x 200 inches
    path = tmp_path / "poster.pdf"
    pdf.save(path)
    _, [page] = expand(path, edge=100_000, opts=RenderOptions(max_pixels=1_000_000))
    # shrunk to the cap, not merely under it: a square page of about 1000 x 1000
    assert page["width"] == page["height"] and 990 <= page["width"] <= 1000


@pytest.mark.parametrize("fmt", ["raw", "png", "jpeg"])
def test_every_page_encoding_decodes_to_the_rendered_pixels(sample_docs, fmt):
    import numpy as np

    _, [ref] = expand(sample_docs / "receipt.png", opts=RenderOptions(image_format="png"))
    _, [page] = expand(sample_docs / "receipt.png", opts=RenderOptions(image_format=fmt))
    assert page["image_codec"] == {"raw": "rgb8+zstd"}.get(fmt, fmt)
    diff = np.abs(np.asarray(page_pil(page), dtype=int) - np.asarray(page_pil(ref), dtype=int))
    assert diff.max() == 0 if fmt != "jpeg" else diff.mean() < 3


def test_raw_pages_over_the_byte_cap_fall_back_to_jpeg(sample_docs):
    _, [page] = expand(sample_docs / "scan.jpg", opts=RenderOptions(max_image_bytes=10_000))
    assert page["image_codec"] == "jpeg" and page_pil(page).size == (page["width"], page["height"])


def test_sniffing_ignores_file_names():
    assert sniff_media_type(b"%PDF-1.4 ...") == "application/pdf"
    assert sniff_media_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_media_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert sniff_media_type(b"PK\x03\x04 docx") is None


def test_listing_recurses_dedupes_and_keeps_unknown_types(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("a/x.pdf", "a/b/y.png", "a/b/z.docx"):
        (tmp_path / rel).write_bytes(b"1")
    refs = list_inputs([str(tmp_path / "a"), str(tmp_path / "a" / "x.pdf"), str(tmp_path / "a/**/*.png")]).refs
    assert [r.source_uri.removeprefix(str(tmp_path)) for r in refs] == ["/a/b/y.png", "/a/b/z.docx", "/a/x.pdf"]


def test_include_exclude_and_manifests(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for rel in ("x.pdf", "y.PNG", "sub/z.pdf", "sub/skip.pdf"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"1")
    listing = list_inputs([str(tmp_path)], include=["*.pdf"], exclude=["sub/skip*"])
    assert [r.source_uri.removeprefix(str(tmp_path)) for r in listing.refs] == ["/sub/z.pdf", "/x.pdf"]
    assert listing.filtered_out == 2

    (tmp_path / "list.txt").write_text("# comment\nx.pdf\n\nsub/z.pdf\n")
    (tmp_path / "list.csv").write_text(f"id,uri\n1,{tmp_path / 'y.PNG'}\n")
    pq.write_table(pa.table({"source_uri": ["x.pdf"]}), tmp_path / "list.parquet")
    for name, expected in (("list.txt", ["/sub/z.pdf", "/x.pdf"]), ("list.csv", ["/y.PNG"]), ("list.parquet", ["/x.pdf"])):
        refs = list_inputs([], manifests=[str(tmp_path / name)]).refs
        assert [r.source_uri.removeprefix(str(tmp_path)) for r in refs] == expected, name


def test_listing_a_missing_input_is_fatal(tmp_path):
    with pytest.raises(InputError, match="not found"):
        list_inputs([str(tmp_path / "nope")])
    with pytest.raises(InputError, match="matches no files"):
        list_inputs([str(tmp_path / "*.pdf")])


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "name,make,media_type,frames",
    [
        ("a.webp", lambda p: _save(Image.new("RGB", (64, 48), "red"), p), "image/webp", 1),
        ("a.bmp", lambda p: _save(Image.new("RGB", (64, 48), "red"), p), "image/bmp", 1),
        ("anim.webp", lambda p: _save(Image.new("RGB", (64, 48), "red"), p, save_all=True, lossless=True,
                                      append_images=[Image.new("RGB", (64, 48), "blue")]), "image/webp", 2),
        ("a.gif", lambda p: _save(Image.new("RGB", (64, 48), "red"), p, save_all=True,
                                  append_images=[Image.new("RGB", (64, 48), "blue")]), "image/gif", 2),
        ("deep.png", lambda p: _save(Image.new("I;16", (64, 48), 40000), p), "image/png", 1),
        ("alpha.png", lambda p: _save(Image.new("RGBA", (64, 48), (0, 0, 0, 0)), p), "image/png", 1),
        ("cmyk.jpg", lambda p: _save(Image.new("CMYK", (64, 48), (0, 0, 0, 0)), p), "image/jpeg", 1),
    ],
)
def test_image_formats_become_rgb_pages(tmp_path, name, make, media_type, frames):
    path = make(tmp_path / name)
    doc, pages = expand(path)
    assert doc["media_type"] == media_type and doc["page_count"] == frames == len(pages)
    for p in pages:
        assert p["status"] == "ok", p
        img = page_pil(p)
        assert img.mode == "RGB" and img.size == (64, 48)
    px = page_pil(pages[0]).getpixel((0, 0))
    if name == "deep.png":
        assert px == (156, 156, 156)  # 40000 / 65535 of white, not clipped to 255
    if name in ("a.gif", "anim.webp"):  # each frame is its own page, with its own pixels
        assert [page_pil(p).getpixel((0, 0)) for p in pages] == [(255, 0, 0), (0, 0, 255)]
    if name in ("alpha.png", "cmyk.jpg"):
        assert px == (255, 255, 255)  # transparent on white; CMYK (0,0,0,0) is white


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (80, 40), "white")
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "phone.jpg", exif=exif.tobytes())
    _, [page] = expand(path)
    assert (page["width"], page["height"]) == (40, 80)


def test_shipped_job_globs_keep_upper_case_and_jpeg_names_and_the_listing_names_what_it_drops(tmp_path):
    """Scanners and phones write SCAN0001.PDF and IMG_0001.JPG, cameras photo.jpeg: the jobs' include globs keep
    them (case-insensitive by default); a file they drop is counted and named."""
    import yaml

    from tests.conftest import REPO

    names = ["IMG_0001.JPG", "SCAN0001.PDF", "a.tiff", "notes.TXT", "photo.jpeg", "report.pdf"]
    for name in names:
        (tmp_path / name).write_bytes(b"1")
    for job in ("adhoc_ocr.yaml", "nightly_invoices.yaml"):
        include = yaml.safe_load((REPO / "jobs" / job).read_text())["include"]
        listing = list_inputs([str(tmp_path)], include=include)
        assert [r.source_uri.rsplit("/", 1)[-1] for r in listing.refs] == [n for n in names if n != "notes.TXT"], job
        assert (listing.filtered_out, listing.filtered) == (1, [(str(tmp_path / "notes.TXT"), "matches no --include ("
                                                                 + ", ".join(repr(p) for p in include) + ")")])
    strict = list_inputs([str(tmp_path)], include=["*.pdf", "*.jpg"], case_sensitive=True)
    assert [r.source_uri.rsplit("/", 1)[-1] for r in strict.refs] == ["report.pdf"] and strict.filtered_out == 5


def six_line_invoice() -> bytes:
    """One page whose six lines are six content streams (each insert_text adds one), as a writer appending
    to a page makes them."""
    doc = pymupdf.open()
    page = doc.new_page()
    for i in range(6):
        page.insert_text((72, 72 + 24 * i), f"Line {i + 1}: item {i + 1} costs {10 * (i + 1)} EUR")
    assert doc.xref_get_key(page.xref, "Contents")[0] == "array"
    return doc.tobytes()


def routed(path):
    """expand_document with routing: a page's text comes from its text layer, however short."""
    from docpipe.config import RouteOptions

    recs = list(expand_document(str(path), OPTS, 500, route=RouteOptions(min_chars=5, min_chars_per_in2=0)))
    return recs[0], recs[1:]


def test_a_truncated_pdf_mupdf_repairs_is_partial_with_the_content_streams_it_lost(tmp_path):
    """The first half of the invoice's bytes: MuPDF repairs the file and draws the first lines, but cannot load
    the later content streams. The page keeps the text that remained and is partial (content_lost, with MuPDF's
    words); the document is partial and flagged repaired. Never ok with content missing."""
    from docpipe.output.ledger import DocumentLedger
    from docpipe.sources import DocumentRef

    data = six_line_invoice()
    path = tmp_path / "invoice.pdf"
    path.write_bytes(data[: len(data) // 2])
    doc, [page] = routed(path)
    assert (doc["status"], doc["repaired"], page["status"]) == ("ok", True, "ok")  # as the render stage sees it
    assert "Line 1" in page["text"] and "Line 6" not in page["text"]
    assert "cannot load content stream part 6/6" in page["damage"]

    ledger = DocumentLedger([DocumentRef(str(path))], "r1")
    assert ledger.add(doc) is None
    row, [page_row] = ledger.add(page)
    assert (page_row["status"], page_row["error_type"]) == ("partial", "content_lost")
    assert "cannot load content stream part 4/6" in page_row["error_message"] and "Line 1" in page_row["text"]
    assert (row["status"], row["error_type"], row["repaired"]) == ("partial", "content_lost", True)
    assert row["error_message"].startswith("1 of 1 pages lost content; first, page 1: content_lost: ")

    whole = tmp_path / "whole.pdf"
    whole.write_bytes(data)
    doc, [page] = routed(whole)
    assert (doc["repaired"], page["damage"], page["text"].count("Line ")) == (False, None, 6)


def test_a_pdf_without_its_header_that_mupdf_opens_is_read(tmp_path):
    data = six_line_invoice()
    body = data[data.index(b"1 0 obj"):]  # the %PDF- line and the binary comment gone
    assert sniff_media_type(body) == "application/pdf"
    path = tmp_path / "headless.pdf"
    path.write_bytes(body)
    doc, pages = expand(path, 500)
    assert (doc["status"], doc["media_type"], doc["page_count"], doc["repaired"]) == ("ok", "application/pdf", 1, True)
    assert pages[0]["status"] == "ok" and pages[0]["damage"] is None
    assert sniff_media_type(b"plain text that mentions 1 0 obj later") is None
