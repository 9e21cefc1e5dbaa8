"""Text layers in every script: right-to-left pages printed by a real browser read in logical order, layers that
cannot be read as text (broken font maps, mojibake, presentation forms, visual order) sent to the model with their
reason, white text on a dark band kept, words broken at a line's end joined as the writer spelled them, and a scan
drawn through a Form XObject measured on the page by PDFium."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

from docpipe.config import RenderOptions, RouteOptions
from docpipe.render.document import expand_document
from docpipe.render.route import pymupdf_text_layer, trust_text_layer
from docpipe.render.scripts import fault_reason, join_hyphenated, text_faults

RTL = Path(__file__).parent / "rtl"  # Chromium's prints of the pages there (make.sh)
AUTO = RouteOptions()
HEBREW = ["שלום לכולם מהצוות שלנו בעיר הגדולה", "אנחנו כותבים מסמכים ארוכים בזמן קצר",
          "עם חברים טובים מכל העולם כולו היום", "המסמך הזה נכתב כדי לבדוק את הסדר"]


def _page(path: Path) -> dict:
    [rec] = [r for r in expand_document(str(path), RenderOptions(), 980, route=AUTO) if r["kind"] == "page"]
    return rec


class _Source(HTMLParser):
    """The page's source as the Markdown docpipe writes: '# ' heading, paragraphs, the table (first row its header)."""

    def __init__(self):
        super().__init__()
        self.parts, self.rows, self.tag, self.text = [], [], None, ""

    def handle_starttag(self, tag, attrs):
        if tag in ("h1", "p", "th", "td"):
            self.tag, self.text = tag, ""
        elif tag == "tr":
            self.rows.append([])

    def handle_data(self, data):
        if self.tag:
            self.text += data

    def handle_endtag(self, tag):
        if tag == self.tag:
            if tag == "h1":
                self.parts.append("# " + self.text)
            elif tag == "p":
                self.parts.append(self.text)
            else:
                self.rows[-1].append(self.text)
            self.tag = None

    def markdown(self) -> str:
        table = ["| " + " | ".join(self.rows[0]) + " |", "|" + "---|" * len(self.rows[0])]
        table += ["| " + " | ".join(row) + " |" for row in self.rows[1:]]
        return "\n\n".join(self.parts + ["\n".join(table)])


@pytest.mark.parametrize("name", ["ar", "he", "he_unruled"])
def test_browser_printed_rtl_pages_read_in_logical_order(name):
    """Arabic (with a Persian line) and Hebrew pages printed by Chromium: heading, paragraphs, numbers inside the
    sentences in place, Arabic-Indic and Persian digit runs and lam-alef ligatures the right way round, brackets
    facing the right way, full stops at the sentences' ends, the table's columns in logical order (its first column
    the rightmost; ruled, and in he_unruled without lines) with the words of each cell in order: the page text is the
    source's."""
    source = _Source()
    source.feed((RTL / f"{name}.html").read_text(encoding="utf-8"))
    rec = _page(RTL / f"{name}.pdf")
    assert (rec["text_source"], rec["route_reason"]) == ("text_layer", "trusted")
    assert rec["text"] == source.markdown()


def test_pdfium_reads_rtl_lines_in_logical_order():
    """PDFium (the renderer for what MuPDF cannot open) gives such lines' words alternately forwards and backwards;
    rebuilt from the characters' boxes they read as written, and the layer is trusted."""
    from docpipe.render.pdfium import PdfiumPage, open_pdfium

    source = _Source()
    source.feed((RTL / "he.html").read_text(encoding="utf-8"))
    layer = PdfiumPage(open_pdfium((RTL / "he.pdf").read_bytes()), 0).text_layer()
    assert layer.text.splitlines() == [p.removeprefix("# ") for p in source.parts] + [" ".join(r) for r in source.rows]
    assert trust_text_layer(layer, AUTO).reason == "trusted"
    arabic = PdfiumPage(open_pdfium((RTL / "ar.pdf").read_bytes()), 0).text_layer()
    for part in ("تقرير الأداء السنوي", "نسبة ٣٫٥ بالمئة", "في ١٦ تجربة", "بتاريخ 5 مايو 2024 تحت الرقم 2024-117",
                 "نصف الدقة ٩٨٫٢ ١٢ ثانية", "در سال ۱۴۰۲ در ۳ بخش"):
        assert part in arabic.text
    assert trust_text_layer(arabic, AUTO).reason == "trusted"


def _write(lines: list[str], font, path: Path, x: float = 72, size: float = 14) -> Path:
    """A page with each line drawn as given, glyph after glyph from left to right, as a producer without bidi or
    shaping writes them."""
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_font(fontname="F0", fontbuffer=font.buffer)
    for i, line in enumerate(lines):
        page.insert_text((x, 90 + i * size * 1.5), line, fontname="F0", fontsize=size)
    doc.save(path)
    return path


@pytest.fixture(scope="module")
def garbled(tmp_path_factory):
    """Layers that cannot be read as text, each made the way such files are made."""
    import pymupdf

    folder = tmp_path_factory.mktemp("garbled")
    paths = {}
    # MuPDF's own HTML writer (HarfBuzz shaping): its ToUnicode maps lam-alef and lam glyphs to Latin letters.
    doc = pymupdf.open()
    html = (RTL / "ar.html").read_text(encoding="utf-8").split("<body>")[1].split("</body>")[0]
    doc.new_page().insert_htmlbox((40, 40, 560, 800), f'<div dir="rtl">{html}</div>')
    doc.save(folder / "mupdf_arabic.pdf")
    paths["broken_font_map"] = folder / "mupdf_arabic.pdf"
    # Arabic as presentation forms (shaped glyphs' own code points), as old producers stored it: Chromium's glyphs.
    shaped = pymupdf.open(RTL / "ar.pdf")[0].get_text(flags=pymupdf.TEXTFLAGS_TEXT | pymupdf.TEXT_IGNORE_ACTUALTEXT)
    lines = [ln for ln in shaped.splitlines() if ln.strip()][:5]
    paths["presentation_forms"] = _write(lines, pymupdf.Font(script=6), folder / "shaped.pdf")  # Noto Naskh Arabic
    # Hebrew in logical order drawn left to right (a producer without bidi) on every other line: mixed order.
    lines = [line if i % 2 else line[::-1] for i, line in enumerate(HEBREW)]
    paths["rtl_visual_order"] = _write(lines, pymupdf.Font(script=5), folder / "hebrew_mixed.pdf")  # Noto Serif Hebrew
    body = "The quarterly report covers shipments, returns and the cost of freight in every region we serve."
    paths["mojibake"] = _write([body, "Caf\u00c3\u00a9 r\u00c3\u00a9sum\u00c3\u00a9 na\u00c3\u00afve "
                                "\u00e2\u20ac\u0153quoted\u00e2\u20ac\u009d it\u00e2\u20ac\u2122s", body],
                               pymupdf.Font("helv"), folder / "mojibake.pdf")
    paths["cid"] = _write([body, "(cid:12)(cid:45)(cid:3) (cid:71)(cid:72) (cid:3)(cid:81)(cid:88)", body],
                          pymupdf.Font("helv"), folder / "cid.pdf")
    return paths


@pytest.mark.parametrize("name, reason", [("broken_font_map", "broken_font_map"),
                                          ("presentation_forms", "presentation_forms"),
                                          ("rtl_visual_order", "rtl_visual_order"), ("mojibake", "mojibake"),
                                          ("cid", "broken_font_map")])
def test_garbled_layers_go_to_the_model_with_their_reason(garbled, name, reason):
    rec = _page(garbled[name])
    assert rec.get("text_source") is None and rec["image"] and rec["route_reason"] == reason


def test_a_producer_without_bidi_is_read_as_its_page_shows_it(tmp_path):
    """Hebrew stored backwards, each glyph placed left to right (the page shows it right): read in logical order."""
    import pymupdf

    rec = _page(_write([line[::-1] for line in HEBREW], pymupdf.Font(script=5), tmp_path / "visual.pdf"))
    assert rec["route_reason"] == "trusted" and rec["text"] == " ".join(HEBREW)


def test_fault_rules_by_numbers():
    words = " ".join(["word"] * 300)
    assert fault_reason(text_faults(words + " caf\u00c3\u00a9" * 3), 0.01) is None  # 3 of 303 words: 1 %
    assert fault_reason(text_faults(words + " caf\u00c3\u00a9" * 4), 0.01) == "mojibake"
    assert fault_reason(text_faults("(cid:3)(cid:4) ok"), 0.01) == "broken_font_map"  # two, of three words
    assert fault_reason(text_faults("a (cid:3) b c"), 0.01) is None  # one is allowed
    hebrew = " ".join(HEBREW)
    assert fault_reason(text_faults(hebrew), 0.01) is None
    assert text_faults(hebrew[::-1]).reversed_words >= 8
    assert fault_reason(text_faults(hebrew[::-1]), 0.01) == "rtl_visual_order"
    # prose in many Latin, Greek, Cyrillic and CJK forms is none of these
    prose = ("SÃO PAULO e MARANHÃO são estados. Größe, Übermaß „Zitat“. Tiếng Việt: Hà Nội, Đà Nẵng. Ελληνικά, "
             "Кириллица, 中文和日本語のテキスト。 x² ≤ 1, α→β, 20 °C, © 2024 ½ ± 5€ — “Quote” … Łódź, İstanbul")
    assert text_faults(prose).mojibake == text_faults(prose).broken_map_words == 0


def test_white_text_on_a_dark_band_is_visible(tmp_path):
    """A ruled table whose heading band is dark with white labels, and a title bar: the labels are read (trusted,
    in the text); white text on the white page beside it still counts as hidden. PDFium sees the same."""
    import pymupdf

    from docpipe.render.pdfium import PdfiumPage, open_pdfium

    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.draw_rect((50, 40, 545, 80), color=None, fill=(0.1, 0.2, 0.45))
    page.insert_text((60, 66), "Quarterly Shipping Summary For All Regions", fontsize=16, color=(1, 1, 1))
    page.insert_textbox((60, 100, 535, 300), "Shipments rose in every region this quarter. " * 8, fontsize=11)
    y = 320
    for r, row in enumerate([["Region", "Shipments", "Returns", "Freight"], ["North", "120", "4", "1,200"],
                             ["South", "135", "6", "1,410"]]):
        if r == 0:
            page.draw_rect((60, y, 540, y + 20), color=None, fill=(0.15, 0.15, 0.15))
        for c, cell in enumerate(row):
            page.insert_text((66 + c * 120, y + 14), cell, fontsize=11, color=(1, 1, 1) if r == 0 else (0, 0, 0))
        y += 20
    for x in (60, 180, 300, 420, 540):
        page.draw_line((x, 320), (x, 380))
    for yy in (320, 340, 360, 380):
        page.draw_line((60, yy), (540, yy))
    doc.save(tmp_path / "bands.pdf")
    layer = pymupdf_text_layer(pymupdf.open(tmp_path / "bands.pdf")[0])
    assert layer.hidden_chars == 0 and trust_text_layer(layer, AUTO).reason == "trusted"
    assert PdfiumPage(open_pdfium((tmp_path / "bands.pdf").read_bytes()), 0).text_layer().hidden_chars == 0
    rec = _page(tmp_path / "bands.pdf")
    assert rec["route_reason"] == "trusted" and "Quarterly Shipping Summary" in rec["text"]
    assert "| Region | Shipments | Returns | Freight |\n|---|---|---|---|\n| North | 120 | 4 | 1,200 |" in rec["text"]
    page = doc[0]
    unseen = "white on white, unseen by a reader " * 2
    page.insert_text((60, 700), unseen, fontsize=11, color=(1, 1, 1))
    doc.save(tmp_path / "hidden.pdf")
    layer = pymupdf_text_layer(pymupdf.open(tmp_path / "hidden.pdf")[0])
    assert layer.hidden_chars == len(unseen.replace(" ", ""))
    pdfium = PdfiumPage(open_pdfium((tmp_path / "hidden.pdf").read_bytes()), 0).text_layer()
    assert pdfium.hidden_chars == layer.hidden_chars
    assert trust_text_layer(layer, AUTO).reason == "hidden_text"


@pytest.mark.parametrize("text, line, joined", [
    ("a conference on high-", "level languages", "a conference on high-level languages"),
    ("the confer-", "ence opened", "the conference opened"),
    ("cases of COVID-", "19 rose", "cases of COVID-19 rose"),
    ("an X-", "ray image", "an X-ray image"),
    ("a non-", "European state", "a non-European state"),
    ("a floating-", "point unit", "a floating-point unit"),
    ("ends with a dash -", "and more", None),
    ("no hyphen", "here", None),
])
def test_line_end_hyphens(text, line, joined):
    compounds = {"high-level", "floating-point"}  # spelled so elsewhere in the document
    assert join_hyphenated(text, line, compounds) == joined


def test_line_end_hyphens_on_a_page(tmp_path):
    """A paragraph whose lines end in hyphens: compounds the page spells with a hyphen elsewhere keep it, a number
    part keeps it, a word the typesetter broke is joined."""
    import pymupdf

    lines = ["We compare high-level and low-level code in a confer-", "ence paper on floating-point units and high-",
             "level languages, whose floating-", "point results and the COVID-", "19 figures are exact."]
    rec = _page(_write(lines, pymupdf.Font("helv"), tmp_path / "hyphens.pdf", size=11))
    assert rec["text"] == ("We compare high-level and low-level code in a conference paper on floating-point units and "
                           "high-level languages, whose floating-point results and the COVID-19 figures are exact.")


def test_pdfium_measures_a_scan_drawn_through_a_scaling_form():
    """A full-page scan placed through a Form XObject that scales it by 2 (its image a quarter of the page in the
    form's space), under a visible layer that says something else: PDFium measures it on the page, as MuPDF does."""
    import pymupdf

    from docpipe.render.pdfium import PdfiumPage, open_pdfium

    src = pymupdf.open()
    half = src.new_page(width=297.5, height=421)
    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 100, 140), False)
    pix.clear_with(200)
    half.insert_image(half.rect, pixmap=pix)
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.show_pdf_page(page.rect, src, 0)
    page.insert_textbox((72, 72, 523, 300), "A visible layer that says something else entirely. " * 6, fontsize=11)
    data = doc.tobytes()
    layer = PdfiumPage(open_pdfium(data), 0).text_layer()
    mupdf = pymupdf_text_layer(pymupdf.open("pdf", data)[0])
    assert layer.image_coverage == pytest.approx(mupdf.image_coverage, abs=0.01) and layer.image_coverage > 0.98
    assert trust_text_layer(layer, AUTO).reason == "full_page_image"
