"""A synthetic but realistic corpus for benchmarks: dense two-column text, tables, vector charts, photos; and
the output length mix the engine benchmarks force on its pages (bench.py, gpu_check.py)."""

from __future__ import annotations

import io
import random
from pathlib import Path

WORDS = (
    "the of and to in revenue quarter region shipment invoice total amount customer account balance report "
    "figure table section analysis growth margin operating cost supplier contract delivery payment schedule "
    "annual summary notes audit compliance forecast inventory warehouse logistics capital expenditure"
).split()


def _paragraph(rnd: random.Random, words: int) -> str:
    text = " ".join(rnd.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def _photo(rnd: random.Random) -> bytes:
    from PIL import Image, ImageFilter

    img = Image.effect_noise((320, 200), 60).convert("RGB").filter(ImageFilter.GaussianBlur(2))
    img = Image.blend(img, Image.new("RGB", img.size, (rnd.randrange(256), 120, 80)), 0.5)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def add_report_page(doc, rnd: random.Random, number: int, photo: bytes) -> None:
    page = doc.new_page(width=595, height=842)
    page.insert_text((50, 60), f"Annual operations review, section {number}", fontsize=16, fontname="hebo")
    left, right = (50, 80, 290, 420), (305, 80, 545, 420)
    for rect in (left, right):
        page.insert_textbox(rect, " ".join(_paragraph(rnd, 40) for _ in range(6)), fontsize=8.5, fontname="tiro",
                            align=3)
    # a 6 x 5 table with ruled cells
    x0, y0, cw, rh = 50, 440, 82, 18
    for r in range(6):
        for c in range(5):
            rect = (x0 + c * cw, y0 + r * rh, x0 + (c + 1) * cw, y0 + (r + 1) * rh)
            page.draw_rect(rect, color=(0, 0, 0), width=0.5)
            cell = rnd.choice(WORDS).title() if r == 0 or c == 0 else f"{rnd.uniform(0, 999):.1f}"
            page.insert_text((rect[0] + 4, rect[1] + 13), cell, fontsize=8, fontname="helv")
    # a vector bar chart and an embedded photo
    for i in range(8):
        h = rnd.uniform(20, 120)
        page.draw_rect((60 + i * 28, 700 - h, 80 + i * 28, 700), color=None, fill=(0.2, 0.4, 0.1 * i))
    page.draw_line((55, 700), (290, 700), color=(0, 0, 0), width=0.8)
    page.insert_image((320, 580, 545, 720), stream=photo)
    page.insert_textbox((50, 730, 545, 800), _paragraph(rnd, 60), fontsize=8.5, fontname="tiro")


# --- the text-layer mix: born-digital pages of the kinds a data lake holds --------------------------------------

# (kind, share of pages): mostly prose, as most born-digital pages are; the rest pages with columns, tables and
# figures, where the layout analysis earns its cost.
TEXT_LAYER_MIX = [("prose", 0.35), ("letter", 0.10), ("two_column", 0.15), ("report", 0.15), ("statement", 0.15),
                  ("booktabs", 0.10)]


def _prose_page(doc, rnd: random.Random, number: int) -> None:
    page = doc.new_page(width=595, height=842)
    page.insert_text((72, 40), "Operations handbook · internal edition", fontsize=8, fontname="helv")
    y = 80
    for section in range(3):
        page.insert_text((72, y), f"{number}.{section + 1} {rnd.choice(WORDS).title()} {rnd.choice(WORDS)}",
                         fontsize=13, fontname="hebo")
        page.insert_textbox((72, y + 10, 523, y + 230), " ".join(_paragraph(rnd, 45) for _ in range(3)),
                            fontsize=10.5, fontname="tiro", align=3)
        y += 235
    page.insert_text((290, 815), str(number), fontsize=9, fontname="helv")


def _letter_page(doc, rnd: random.Random, number: int) -> None:
    page = doc.new_page(width=595, height=842)
    page.insert_text((72, 50), "Northwind Supplies Ltd · 12 Harbour Road · www.northwind.example.com", fontsize=8)
    page.insert_text((400, 120), "14 March 2025", fontsize=11)
    page.insert_text((72, 160), "Dear customer,", fontsize=11)
    page.insert_textbox((72, 180, 523, 640), "\n\n".join(_paragraph(rnd, 60) for _ in range(4)), fontsize=11)
    page.insert_text((72, 690), "Yours sincerely,", fontsize=11)
    page.insert_text((72, 805), f"Confidential · Ref. {1000 + number} · Page 1 of 1", fontsize=8)


def _two_column_page(doc, rnd: random.Random, number: int) -> None:
    page = doc.new_page(width=595, height=842)
    page.insert_text((50, 60), f"{rnd.choice(WORDS).title()} and {rnd.choice(WORDS)}: a study", fontsize=16,
                     fontname="hebo")
    for x0 in (50, 305):
        y = 90
        for _ in range(3):
            page.insert_textbox((x0, y, x0 + 240, y + 220), _paragraph(rnd, 80), fontsize=9, fontname="tiro",
                                align=3)
            y += 225
    page.insert_text((50, 815), f"Journal of Operations | Vol. 8 | Issue 3 | e{2700 + number}", fontsize=7)


def _statement_page(doc, rnd: random.Random, number: int) -> None:
    """An unruled financial statement: a group header over three years, group rows, figures with shares."""
    page = doc.new_page(width=595, height=842)
    page.insert_text((72, 70), f"Statement {number}: results by line", fontsize=14, fontname="hebo")
    page.insert_textbox((72, 85, 523, 160), _paragraph(rnd, 50), fontsize=10)
    page.insert_text((330, 185), "Year ended", fontsize=9, fontname="hebo")
    page.draw_line((250, 189), (523, 189), width=0.5)
    y = 203
    for c, year in enumerate(("2022", "2023", "2024")):
        page.insert_text((260 + c * 95, y), year, fontsize=9, fontname="hebo")
    for r in range(22):
        y += 14
        if r % 7 == 0:
            page.insert_text((72, y), rnd.choice(WORDS).title() + " items", fontsize=9, fontname="hebo")
            continue
        page.insert_text((82, y), f"{rnd.choice(WORDS).title()} {rnd.choice(WORDS)}", fontsize=9)
        for c in range(3):
            page.insert_text((260 + c * 95, y), f"{rnd.uniform(100, 9999):,.0f} ({rnd.uniform(0, 9):.1f})", fontsize=9)
    page.insert_textbox((72, y + 30, 523, y + 120), _paragraph(rnd, 40), fontsize=10)


def _booktabs_page(doc, rnd: random.Random, number: int) -> None:
    page = doc.new_page(width=595, height=842)
    page.insert_textbox((72, 72, 523, 250), " ".join(_paragraph(rnd, 50) for _ in range(2)), fontsize=10.5)
    page.insert_text((72, 275), f"Table {number}: measurements by site", fontsize=9)
    y = 300
    page.draw_line((72, y - 12), (523, y - 12), width=1)
    for r in range(8):
        cells = ["Site", "Mean", "SD", "n"] if r == 0 else \
            [rnd.choice(WORDS).title(), f"{rnd.uniform(1, 99):.2f}", f"{rnd.uniform(0, 9):.2f}",
             str(rnd.randrange(9, 99))]
        for c, cell in enumerate(cells):
            page.insert_text((76 + c * 110, y), cell, fontsize=9)
        if r == 0:
            page.draw_line((72, y + 4), (523, y + 4), width=0.5)
        y += 15
    page.draw_line((72, y - 10), (523, y - 10), width=1)
    page.insert_textbox((72, y + 20, 523, y + 250), " ".join(_paragraph(rnd, 50) for _ in range(2)), fontsize=10.5)


def make_text_layer_corpus(folder: str | Path, pages: int = 60, seed: int = 0) -> list[Path]:
    """Born-digital PDFs in the TEXT_LAYER_MIX, one document per kind (its pages in a row, so running heads repeat
    as they do in real documents), for ``docpipe bench --text-layer``."""
    import pymupdf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    photo = _photo(rnd)
    makers = {"prose": _prose_page, "letter": _letter_page, "two_column": _two_column_page,
              "report": lambda doc, rnd, n: add_report_page(doc, rnd, n, photo), "statement": _statement_page,
              "booktabs": _booktabs_page}
    counts = [max(1, round(share * pages)) for _, share in TEXT_LAYER_MIX]
    paths = []
    for (kind, _), count in zip(TEXT_LAYER_MIX, counts):
        doc = pymupdf.open()
        for n in range(count):
            makers[kind](doc, rnd, n + 1)
        path = folder / f"{kind}.pdf"
        doc.save(path, garbage=3, deflate=True)
        paths.append(path)
    return paths


def make_bench_corpus(folder: str | Path, pages: int = 200, pages_per_doc: int = 20, seed: int = 0) -> list[Path]:
    import pymupdf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    photo = _photo(rnd)
    paths, made = [], 0
    while made < pages:
        doc = pymupdf.open()
        for _ in range(min(pages_per_doc, pages - made)):
            made += 1
            add_report_page(doc, rnd, made, photo)
        path = folder / f"report-{len(paths):03d}.pdf"
        doc.save(path, garbage=3, deflate=True)
        paths.append(path)
    return paths


def make_image_corpus(folder: str | Path, pages: int, longest_edge: int, seed: int = 0) -> list[Path]:
    """The same kind of page drawn with Pillow, one PNG per page at the render size: for the engine bench on a
    machine without PyMuPDF (a bare CUDA machine). What the engines cost depends on the page's size, which is
    the same, not on how it was drawn."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    width, height = round(longest_edge * 595 / 842), longest_edge
    paths = []
    for n in range(pages):
        img = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(img)
        scale = height / 842
        draw.text((50 * scale, 50 * scale), f"Annual operations review, section {n + 1}", fill="black")
        for line in range(60):  # two columns of text
            for col in (50, 305):
                draw.text((col * scale, (80 + line * 5.5) * scale), _paragraph(rnd, 6)[:48], fill="black")
        for r in range(6):  # a ruled table
            for c in range(5):
                x, y = (50 + c * 82) * scale, (440 + r * 18) * scale
                draw.rectangle((x, y, x + 82 * scale, y + 18 * scale), outline="black")
        path = folder / f"page-{n:04d}.png"
        img.save(path)
        paths.append(path)
    return paths


# The output length mix: each page is forced to stop at its own length, lognormal around a median with this
# spread (sigma of the log), capped at max_new_tokens, drawn with a fixed seed, so every row decodes the same
# tokens. Real OCR outputs range from a few tokens (a near-empty page) to over a thousand (a dense one).
LENGTH_SPREAD = 0.9
LENGTH_SEED = 0


def length_mix(pages: int, median: int, cap: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(LENGTH_SEED)
    draws = median * np.exp(LENGTH_SPREAD * rng.standard_normal(pages))
    return [int(x) for x in np.clip(np.round(draws), 1, cap)]
