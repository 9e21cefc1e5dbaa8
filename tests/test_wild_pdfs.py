"""PDFs from the wild: what MuPDF gives up on goes to PDFium, and no document takes the render process down.

The files are built byte by byte, each a kind seen in real-world corpora: page trees with a missing or
impossible /Count, a catalog pointing at a page instead of a page tree, a page tree that loops, attachments
that are the only encrypted part. Each test first checks that MuPDF really fails on its file, so a MuPDF
that learns to read one shows up here rather than passing silently.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pymupdf
import pytest

from docpipe.config import RenderOptions
from docpipe.render.document import expand_document
from docpipe.render.isolated import expand_document_isolated
from tests.conftest import REPO

OPTS = RenderOptions()
CONTENT = b"BT /F1 48 Tf 72 600 Td (Hello wild) Tj ET"
FONT = "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
PAGE = ("<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>")


def build_pdf(objects: list[str | bytes], trailer: str = "") -> bytes:
    """A PDF with objects 1..n in order and a correct cross-reference table; object 1 is the catalog."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + (body if isinstance(body, bytes) else body.encode()) + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R {trailer}>>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def one_page_pdf(pages_node: str = "<< /Type /Pages /Kids [3 0 R] /Count 1 >>", root: str = "2 0 R",
                 extra: list[str] | None = None, trailer: str = "", catalog_extra: str = "") -> bytes:
    stream = b"<< /Length %d >>\nstream\n" % len(CONTENT) + CONTENT + b"\nendstream"
    return build_pdf([f"<< /Type /Catalog /Pages {root} {catalog_extra}>>", pages_node, PAGE, stream, FONT,
                      *(extra or [])], trailer)


def encrypted_pdf(streams: str, strings: str) -> bytes:
    """A standard-security-handler PDF (AES-128, R4) whose user password is not empty; ``streams`` and
    ``strings`` name the crypt filters for page content and strings (/Identity: not encrypted). Its one
    attachment is always under /StdCF, the way a PDF with encrypted attachments only is made (/EFF)."""
    crypt = (f"<< /Filter /Standard /V 4 /R 4 /Length 128 /P -4 /O <{'11' * 32}> /U <{'22' * 32}> "
             "/CF << /StdCF << /CFM /AESV2 /AuthEvent /EFOpen /Length 16 >> >> "
             f"/StmF {streams} /StrF {strings} /EFF /StdCF >>")
    attachment = "<< /Type /EmbeddedFile /Length 32 >>\nstream\n" + "x" * 32 + "\nendstream"
    return one_page_pdf(
        extra=[crypt, "<< /Type /Filespec /F (a.txt) /UF (a.txt) /EF << /F 8 0 R >> >>", attachment],
        catalog_extra="/Names << /EmbeddedFiles << /Names [(a.txt) 7 0 R] >> >> ",
        trailer=f"/Encrypt 6 0 R /ID [<{'ab' * 16}> <{'ab' * 16}>] ")


# name -> (bytes, what MuPDF does with them)
WILD = {
    # MuPDF takes /Count at its word: zero pages, though the tree holds one
    "count_missing.pdf": (one_page_pdf("<< /Type /Pages /Kids [3 0 R] >>"), "no pages"),
    "root_is_a_page.pdf": (one_page_pdf(root="3 0 R"), "no pages"),
    # pdf.page_count raises "code=7: Invalid number of pages" (the exception that used to end the render process)
    "count_negative.pdf": (one_page_pdf("<< /Type /Pages /Kids [3 0 R] /Count -5 >>"), "count raises"),
    # only the attachment is encrypted: MuPDF asks a password, the pages need none
    "encrypted_attachment.pdf": (encrypted_pdf("/Identity", "/Identity"), "needs a password"),
}


def mupdf_verdict(data: bytes) -> str:
    pymupdf.TOOLS.mupdf_display_errors(False)
    pdf = pymupdf.open(stream=data, filetype="pdf")
    if pdf.needs_pass:
        return "needs a password"
    try:
        return "no pages" if pdf.page_count == 0 else "has pages"
    except RuntimeError:
        return "count raises"


def mupdf_page_pixels(data: bytes, tmp_path) -> np.ndarray:
    """How the stage renders an intact file's page with MuPDF."""
    path = tmp_path / "intact-reference.pdf"
    path.write_bytes(data)
    doc, page = list(expand_document(str(path), OPTS, 1960))
    assert page["renderer"] == "pymupdf"
    return page_pixels(page)


def page_pixels(rec) -> np.ndarray:
    from docpipe.ocr import decode_page

    return decode_page(rec["image"], rec["image_codec"], rec["width"], rec["height"]).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def wild_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wild")
    for name, (data, _) in WILD.items():
        (folder / name).write_bytes(data)
    (folder / "intact.pdf").write_bytes(one_page_pdf())
    return folder


@pytest.mark.parametrize("name", list(WILD))
def test_pdfs_mupdf_gives_up_on_render_through_pdfium_in_the_same_render_process(wild_dir, name, tmp_path):
    data, verdict = WILD[name]
    assert mupdf_verdict(data) == verdict  # the premise: MuPDF alone would lose this document
    intact = mupdf_page_pixels(one_page_pdf(), tmp_path)

    before = list(expand_document_isolated(str(wild_dir / "intact.pdf"), OPTS, 1960))
    from docpipe.render import isolated

    pid = isolated._worker.process.pid
    [doc, page] = list(expand_document_isolated(str(wild_dir / name), OPTS, 1960))
    after = list(expand_document_isolated(str(wild_dir / "intact.pdf"), OPTS, 1960))
    assert isolated._worker.process.pid == pid and isolated._worker.process.is_alive()
    assert [r["status"] for r in before + after] == ["ok"] * 4

    assert (doc["status"], doc["page_count"], doc["renderer"]) == ("ok", 1, "pdfium")
    assert (page["status"], page["renderer"], page["page_number"]) == ("ok", "pdfium", 1)
    # the size MuPDF gives the same page (a plain ceil, as page.render() sizes, would make it 1516 x 1961)
    assert (page["width"], page["height"]) == (before[1]["width"], before[1]["height"]) == (1515, 1960)
    pixels = page_pixels(page)
    assert pixels.shape == intact.shape
    ink, ink_mupdf = pixels.min(axis=2) < 128, intact.min(axis=2) < 128
    assert ink.sum() > 2000  # the text is drawn, not a blank page
    assert (ink & ink_mupdf).sum() / (ink | ink_mupdf).sum() > 0.8  # where MuPDF draws it


def test_a_page_mupdf_fails_on_is_rendered_and_read_by_pdfium(tmp_path):
    # The page tree lists itself among its kids: MuPDF counts one page and then cannot load it.
    data = one_page_pdf("<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 1 >>")
    with pytest.raises(Exception):
        pymupdf.open(stream=data, filetype="pdf").load_page(0)
    from docpipe.render.open import open_pages

    pages = open_pages(data, "application/pdf")
    assert next(pages) == (1, "pymupdf", False)  # MuPDF opened the document (and did not repair it)
    page = next(pages)
    assert page.renderer == "pymupdf"  # until it has rendered
    rendered = page(OPTS, 1960)
    assert (rendered.width, rendered.height, page.renderer) == (1515, 1960, "pdfium")
    assert page.text().strip() == "Hello wild"  # the text layer of the renderer that drew the page

    path = tmp_path / "loop.pdf"
    path.write_bytes(data)
    doc, row = list(expand_document(str(path), OPTS, 1960))
    assert (doc["status"], doc["renderer"], row["status"], row["renderer"]) == ("ok", "pymupdf", "ok", "pdfium")


def test_text_layer_routing_reads_the_text_of_the_renderer_that_drew_the_page(wild_dir, tmp_path):
    """A page PDFium drew is judged and answered by PDFium's text layer (its own view of the characters)."""
    from docpipe.config import RouteOptions

    route = RouteOptions(text_layer="auto", min_chars=5, min_chars_per_in2=0)
    path = tmp_path / "loop.pdf"
    path.write_bytes(one_page_pdf("<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 1 >>"))  # a page MuPDF fails on
    for source in (path, wild_dir / next(iter(WILD))):  # a page, and a whole document, MuPDF gave up on
        _, row = list(expand_document(str(source), OPTS, 1960, route=route))
        assert (row["renderer"], row["text_source"], row["text"]) == ("pdfium", "text_layer", "Hello wild")
        assert "image" not in row  # answered by its text layer: no image travels to the model


def test_a_page_neither_renderer_can_load_gives_both_reasons(tmp_path):
    path = tmp_path / "short.pdf"  # /Count says two pages, the tree holds one
    path.write_bytes(one_page_pdf("<< /Type /Pages /Kids [3 0 R] /Count 2 >>"))
    doc, first, second = list(expand_document(str(path), OPTS, 1960))
    assert (doc["page_count"], first["status"], first["renderer"]) == (2, "ok", "pymupdf")
    assert (second["status"], second["error_type"], second.get("renderer")) == ("error", "render_error", None)
    assert second["error_message"].startswith("MuPDF: ") and "; PDFium: cannot load page 2" in second["error_message"]


@pytest.mark.parametrize(
    "data,error_type,message",
    [
        # neither engine can parse it
        (b"%PDF-1.7\n" + b"\x00" * 64, "corrupt_document", "cannot open PDF: MuPDF: FileDataError"),
        # MuPDF's page count raises, PDFium finds no pages: they do not agree that it is empty
        (one_page_pdf("<< /Type /Pages /Kids [] /Count -5 >>"), "corrupt_document",
         "cannot open PDF: MuPDF: RuntimeError: code=7: Invalid number of pages; PDFium: no pages"),
        # both count zero pages: an empty page tree, or none at all
        (one_page_pdf("<< /Type /Pages /Kids [] /Count 0 >>"), "empty_document",
         "PDF has no pages (MuPDF: no pages; PDFium: no pages)"),
        (one_page_pdf(root="9 0 R"), "empty_document", "PDF has no pages (MuPDF: no pages; PDFium: no pages)"),
        # page content and strings encrypted too: the pages themselves need the password
        (encrypted_pdf("/StdCF", "/StdCF"), "encrypted_document", "PDF is encrypted and needs a password (MuPDF: "
                                                                 "needs a password; PDFium: PdfiumError"),
    ],
    ids=["unreadable", "count-raises-and-no-pages", "zero-pages", "no-page-tree", "encrypted-pages"],
)
def test_error_types_say_what_both_renderers_found(tmp_path, data, error_type, message):
    path = tmp_path / "doc.pdf"
    path.write_bytes(data)
    [doc] = list(expand_document(str(path), OPTS, 1960))
    assert (doc["status"], doc["error_type"]) == ("error", error_type)
    assert doc["error_message"].startswith(message), doc["error_message"]


def test_a_password_error_is_never_an_earlier_documents(tmp_path):
    """PDFium leaves its last error code alone when it finds no pages: after a locked file, a file without a
    page tree must not read as locked."""
    for name, data in [("locked.pdf", encrypted_pdf("/StdCF", "/StdCF")), ("treeless.pdf", one_page_pdf(root="9 0 R"))]:
        (tmp_path / name).write_bytes(data)
    [locked] = list(expand_document(str(tmp_path / "locked.pdf"), OPTS, 1960))
    [treeless] = list(expand_document(str(tmp_path / "treeless.pdf"), OPTS, 1960))
    assert (locked["error_type"], treeless["error_type"]) == ("encrypted_document", "empty_document")


RENDER_SCRIPT = """
import json, sys
from docpipe.render import isolated
from docpipe.config import RenderOptions
out = []
for path in sys.argv[1:]:
    recs = list(isolated.expand_document_isolated(path, RenderOptions(), 980))
    out.append({"pid": isolated._worker.process.pid, "rows": [
        {k: r.get(k) for k in ("kind", "status", "error_type", "error_message", "renderer")} for r in recs]})
print(json.dumps(out))
"""


def test_a_document_that_raises_in_the_render_process_is_an_error_row_and_no_traceback(wild_dir, tmp_path):
    # /Count -5 makes MuPDF's page_count raise; with no kids PDFium finds no pages either.
    raising = tmp_path / "raises.pdf"
    raising.write_bytes(one_page_pdf("<< /Type /Pages /Kids [] /Count -5 >>"))
    assert mupdf_verdict(raising.read_bytes()) == "count raises"
    paths = [wild_dir / "intact.pdf", raising, wild_dir / "count_negative.pdf", wild_dir / "intact.pdf"]
    proc = subprocess.run([sys.executable, "-c", RENDER_SCRIPT, *map(str, paths)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert len({r["pid"] for r in results}) == 1  # one render process served all four
    [doc] = results[1]["rows"]
    assert (doc["status"], doc["error_type"]) == ("error", "corrupt_document")
    assert "MuPDF: RuntimeError: code=7: Invalid number of pages; PDFium: no pages" in doc["error_message"]
    assert [r["renderer"] for r in results[2]["rows"]] == ["pdfium", "pdfium"]
    assert [r["status"] for r in results[3]["rows"]] == ["ok", "ok"]


def test_an_exception_escaping_a_document_ends_that_document_not_the_render_process(monkeypatch, capfd, tmp_path):
    """The render loop's last guard, driven in a thread: a bug that raises halfway through a document."""
    import multiprocessing
    import threading

    from docpipe.render import isolated

    real = isolated.expand_document

    def buggy(source_uri, *args, **kwargs):
        gen = real(source_uri, *args, **kwargs)
        yield next(gen)
        if "bug" in source_uri:
            raise KeyError("a bug")
        yield from gen

    monkeypatch.setattr(isolated, "expand_document", buggy)
    path = tmp_path / "doc.pdf"
    path.write_bytes(one_page_pdf())
    parent, child = multiprocessing.Pipe()
    server = threading.Thread(target=isolated._render_server, args=(child,), daemon=True)
    server.start()
    assert parent.recv() == "started"

    def serve(uri):
        parent.send((uri, OPTS, (980,), {}))
        recs = []
        while (rec := parent.recv()) is not None and not isinstance(rec, tuple):
            recs.append(rec)
        return recs, rec

    path.with_name("bug.pdf").write_bytes(one_page_pdf())
    recs, end = serve(str(path.with_name("bug.pdf")))
    assert [r["kind"] for r in recs] == ["document"]
    assert end == ("render_error", "rendering failed: KeyError: 'a bug'")
    failure = end
    recs, end = serve(str(path))  # the same loop takes the next document
    assert [(r["kind"], r["status"]) for r in recs] == [("document", "ok"), ("page", "ok")] and end is None
    parent.close()
    server.join(10)
    assert not server.is_alive()  # the pipe closed: the loop ends quietly
    assert "Traceback" not in capfd.readouterr().err

    # and the parent turns the tuple into rows for what the document did not deliver
    rows = list(isolated._finish_undelivered("x.pdf", {**recs[0], "page_count": 2}, {"page": {1}, "chunk": set()},
                                              failure))
    assert [(r["page_number"], r["error_type"]) for r in rows] == [(2, "render_error")]


def test_a_run_counts_the_fallbacks_and_records_the_renderer(wild_dir, tmp_path, tiny_checkpoint):
    from docpipe.config import ModelOptions, RunConfig
    from docpipe.execute.run import run

    (tmp_path / "in").mkdir()
    for name in ("count_missing.pdf", "encrypted_attachment.pdf", "intact.pdf"):
        (tmp_path / "in" / name).write_bytes((wild_dir / name).read_bytes())
    (tmp_path / "in" / "loop.pdf").write_bytes(one_page_pdf("<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 1 >>"))
    result = run(RunConfig(inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), executor="local",
                           model=ModelOptions(name="tiny-random", max_new_tokens=2), partition_by="none"))
    counters = result.manifest.counters
    assert (counters["documents_opened_pdfium"], counters["pages_rendered_pdfium"]) == (2, 3)
    manifest = json.loads(next((tmp_path / "out" / "_runs").glob("*.json")).read_text())
    assert manifest["counters"]["pages_rendered_pdfium"] == 3
    pages = pq.read_table(tmp_path / "out" / "pages").to_pylist()
    by_name = {p["source_uri"].rsplit("/", 1)[-1]: p for p in pages}
    assert {n: (p["status"], p["renderer"]) for n, p in by_name.items()} == {
        "count_missing.pdf": ("ok", "pdfium"), "encrypted_attachment.pdf": ("ok", "pdfium"),
        "intact.pdf": ("ok", "pymupdf"), "loop.pdf": ("ok", "pdfium")}
    docs = pq.read_table(tmp_path / "out" / "documents").to_pylist()
    assert {d["status"] for d in docs} == {"ok"} and len(docs) == 4


def test_pdfium_pages_match_mupdf_pages_in_size_and_ink():
    """Same sizing rules, pixel cap included, on rotated, cropped and odd-sized pages."""
    from docpipe.render.open import _PdfPage
    from docpipe.render.pdfium import PdfiumPage, open_pdfium
    from docpipe.render.pixels import decode_raw

    doc = pymupdf.open()
    for width, height, rotate, crop in [(612, 792, 0, None), (595.28, 841.89, 90, None), (612.5, 791.3, 0, None),
                                        (1000, 700, 270, (100, 50, 800, 650)), (14400, 14400, 0, None)]:
        page = doc.new_page(width=width, height=height)
        k = width / 612  # content in proportion to the page
        page.insert_text((160 * k, 120 * k), "Same page, two engines", fontsize=30 * k)
        page.draw_rect(pymupdf.Rect(160, 200, 400, 300) * k, color=(0, 0, 0), fill=(0.2, 0.4, 0.8))
        if crop:
            page.set_cropbox(pymupdf.Rect(*crop))
        page.set_rotation(rotate)
    data = doc.tobytes()
    mupdf, pdfium = pymupdf.open(stream=data, filetype="pdf"), open_pdfium(data)
    opts = RenderOptions(max_pixels=3_000_000)  # the poster goes over it, the others stay under
    for index in range(len(doc)):
        a, b = _PdfPage(mupdf, index)(opts, 1960), PdfiumPage(pdfium, index)(opts, 1960)
        assert (a.width, a.height, a.codec) == (b.width, b.height, b.codec), index
        pa, pb = decode_raw(a.image, a.width, a.height), decode_raw(b.image, b.width, b.height)
        ink_a, ink_b = pa.min(axis=2) < 160, pb.min(axis=2) < 160
        assert ink_a.sum() > 300 and (ink_a & ink_b).sum() / (ink_a | ink_b).sum() > 0.8, index
    assert (a.width, a.height) == (1733, 1733)  # the poster, shrunk by both to the cap: sqrt(3e6), rounded up
