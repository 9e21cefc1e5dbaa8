"""The bad-input corpus, built by code so it grows with every bug found (olmOCR keeps one as files).

Each entry: file name -> (bytes maker, expected documents status, expected error_type or None).
"""

from __future__ import annotations

import io
import os
import zipfile


def _pdf(pages: int = 3, **save) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for i in range(pages):
        doc.new_page().insert_text((72, 72), f"page {i + 1}")
    return doc.tobytes(**save)


def _truncated_pdf() -> bytes:
    """Half of a 4-page PDF, the same bytes every time (no random /ID), cut where neither MuPDF nor PDFium can open
    it. A file with a fresh /ID cut at a fixed fraction moved with the ID's length: about 1 cut in 150 left a file
    MuPDF repaired, and the document came out ok instead of corrupt."""
    data = _pdf(4, no_new_id=True)
    return data[: len(data) // 2]


def _image(mode: str, size=(64, 48), fmt="PNG", color=0, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _encrypted() -> bytes:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "secret")
    return doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="owner")


def _broken_xref() -> bytes:
    data = _pdf(4)
    at = data.rfind(b"startxref")
    return data[:at] + b"startxref\n123456\n%%EOF\n"  # points nowhere: MuPDF rebuilds the table


def _huge_page() -> bytes:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page(width=14400, height=14400).insert_text((72, 72), "a 200 x 200 inch poster")
    return doc.tobytes()


def _exif_rotated() -> bytes:
    from PIL import Image

    img = Image.new("RGB", (80, 40), "white")
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _multipage_tiff() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (50, 50), "red").save(buf, format="TIFF", save_all=True,
                                            append_images=[Image.new("RGB", (50, 50), "blue")])
    return buf.getvalue()


def _animated_gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buf, format="GIF", save_all=True,
                                           append_images=[Image.new("RGB", (40, 40), c) for c in ("green", "blue")])
    return buf.getvalue()


def noise(n: int, seed: int = 11) -> bytes:
    """Bytes no sniffer recognises: a NUL first (no image signature starts with one), from a fixed seed, and
    checked for a PDF header (os.urandom could start with 'BM' one time in 65,536, and be sniffed as a BMP)."""
    import random

    data = b"\0" + random.Random(seed).randbytes(n - 1)
    assert b"%PDF-" not in data[:1024]
    return data


def _docx() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("word/document.xml", "<w:document/>")
    return buf.getvalue()


CORPUS = {
    "empty.pdf": (lambda: b"", "error", "empty_file"),
    "random.pdf": (lambda: noise(5000), "error", "unsupported_media_type"),
    "truncated.pdf": (_truncated_pdf, "error", "corrupt_document"),
    "encrypted.pdf": (_encrypted, "error", "encrypted_document"),
    "broken_xref.pdf": (_broken_xref, "ok", None),
    "huge_page.pdf": (_huge_page, "ok", None),
    "bomb.png": (lambda: _image("1", (20000, 20000)), "error", "image_too_large"),
    "cmyk.jpg": (lambda: _image("CMYK", fmt="JPEG"), "ok", None),
    "deep.png": (lambda: _image("I;16", color=40000), "ok", None),
    "palette.png": (lambda: _image("P", color=3), "ok", None),
    "transparent.png": (lambda: _image("RGBA", color=(0, 0, 0, 0)), "ok", None),
    "exif.jpg": (_exif_rotated, "ok", None),
    "multi.tiff": (_multipage_tiff, "ok", None),
    "anim.gif": (_animated_gif, "ok", None),
    "notes.txt": (lambda: b"plain text, not a document\n", "error", "unsupported_media_type"),
    "page.html": (lambda: b"<!doctype html><html><body>hi</body></html>", "error", "unsupported_media_type"),
    "letter.docx": (_docx, "error", "unsupported_media_type"),
}

PAGES = {"broken_xref.pdf": 4, "huge_page.pdf": 1, "multi.tiff": 2, "anim.gif": 3}


def write_corpus(folder) -> dict[str, tuple[str, str | None]]:
    os.makedirs(folder, exist_ok=True)
    expected = {}
    for name, (make, status, error_type) in CORPUS.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(make())
        expected[name] = (status, error_type)
    return expected
