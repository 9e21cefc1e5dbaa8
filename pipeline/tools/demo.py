"""``docpipe demo``: a few sample documents for the pipeline (cli.py runs it over them and prints the summary),
then one page of each route.

With a CUDA GPU it runs the real default model; on a CPU-only machine the tiny random
model, whose text is meaningless: the demo then shows the pipeline, not OCR quality. The born-digital
PDFs' pages take their text from their text layer (--text-layer auto, the default), as Markdown, on either.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

LOREM = (
    "Quarterly operations report. Shipments rose in every region while returns fell. The table below "
    "lists revenue by region and quarter, in thousands of euros. Figures are unaudited."
)
TABLE = [["Region", "Q1", "Q2", "Q3"], ["North", "120", "135", "150"], ["South", "98", "101", "117"],
         ["East", "143", "139", "160"], ["West", "87", "95", "102"]]


def _text_pdf_page(doc, title: str, body: str, table: list[list[str]] | None) -> None:
    page = doc.new_page(width=595, height=842)  # A4 in points
    page.insert_text((72, 90), title, fontsize=20)
    page.insert_textbox((72, 110, 523, 300), body, fontsize=11)
    if table:
        x0, y0, cw, rh = 72, 320, 110, 24
        for r, row in enumerate(table):
            for c, cell in enumerate(row):
                rect = (x0 + c * cw, y0 + r * rh, x0 + (c + 1) * cw, y0 + (r + 1) * rh)
                page.draw_rect(rect, color=(0, 0, 0), width=0.8)
                page.insert_text((rect[0] + 6, rect[1] + 16), cell, fontsize=11)


def make_samples(folder: str | os.PathLike) -> list[Path]:
    """Write the demo documents: two multi-page PDFs, a scanned-looking JPEG, a receipt PNG, a 2-page TIFF."""
    import pymupdf
    from PIL import Image, ImageDraw, ImageFilter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(7)

    report = pymupdf.open()
    _text_pdf_page(report, "Operations report", LOREM, TABLE)
    _text_pdf_page(report, "Regional notes", LOREM.replace("Quarterly", "Regional"), None)
    _text_pdf_page(report, "Appendix", "Definitions and sources.", TABLE[:3])
    report.save(folder / "report.pdf")

    minutes = pymupdf.open()
    for n in range(2):
        _text_pdf_page(minutes, f"Board minutes, part {n + 1}", "Present: the board. " * 12, None)
    minutes.save(folder / "minutes.pdf")

    # Scanned look: a rendered page, greyscale, slightly rotated, with speckle, saved as JPEG.
    pix = report[0].get_pixmap(dpi=110)
    scan = Image.open(io.BytesIO(pix.tobytes("png"))).convert("L").rotate(0.8, expand=True, fillcolor=255)
    noise = Image.effect_noise(scan.size, 18).filter(ImageFilter.GaussianBlur(0.6))
    scan = Image.blend(scan, noise, 0.12)
    scan.save(folder / "scan.jpg", quality=80)

    receipt = Image.new("RGB", (380, 640), "white")
    draw = ImageDraw.Draw(receipt)
    lines = ["CORNER CAFE", "12 Market Street", "2026-11-24 08:41", ""]
    total = 0.0
    for item in ("Espresso", "Croissant", "Orange juice", "Muffin"):
        price = round(rnd.uniform(1.5, 5.0), 2)
        total += price
        lines.append(f"{item:<20}{price:>8.2f}")
    lines += ["", f"{'TOTAL EUR':<20}{total:>8.2f}", "Thank you!"]
    for i, line in enumerate(lines):
        draw.text((24, 24 + i * 26), line, fill="black")
    receipt.save(folder / "receipt.png")

    frames = [Image.open(io.BytesIO(report[i].get_pixmap(dpi=72).tobytes("png"))).convert("RGB") for i in (0, 1)]
    frames[0].save(folder / "fax.tiff", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    return sorted(p for p in folder.iterdir() if p.is_file())


def prepare(args) -> tuple[list[str], str]:
    """Write the sample documents and pick the model (the tiny one without a GPU); the run's inputs and output.
    cli.py runs them and prints the summary, then ``show``."""
    from docpipe.config import TINY_MODEL
    from docpipe.model.load import pick_device

    workdir = Path(args.workdir)
    samples = make_samples(workdir / "samples")
    gpu = pick_device() == "cuda"
    if not args.model:
        args.model = None if gpu else TINY_MODEL
    if args.model == TINY_MODEL:
        print("No CUDA GPU in use: running the tiny random Idefics2 model. Its text is meaningless; "
              "this demo shows the pipeline (rendering, image splitting, batching, Parquet), not OCR quality.")
        args.max_new_tokens = args.max_new_tokens or 24
    print(f"Sample documents: {len(samples)} in {workdir / 'samples'}")
    return [str(workdir / "samples")], str(workdir / "out")


def show(result) -> None:
    """After the run's summary: one page of each route, and how to see the rest."""
    import pyarrow.parquet as pq

    pages = sorted(pq.read_table(Path(result.output) / "pages").to_pylist(),
                   key=lambda p: (p["source_uri"], p["page_number"]))
    for source in ("text_layer", "model"):  # one page of each route
        first = next((p for p in pages if p["status"] == "ok" and p["text_source"] == source), None)
        if first:
            print(f"a {source} page ({Path(first['source_uri']).name} p{first['page_number']}, "
                  f"{first['width']}x{first['height']} px): {first['text'][:120]!r}")
    print(f"see it: docpipe report {result.output}")
