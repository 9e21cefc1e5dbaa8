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
