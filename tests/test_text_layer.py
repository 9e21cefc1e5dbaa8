"""Text-layer pages as Markdown, through the render stage (expand_document with --text-layer auto), on PDFs built
here: tables keep their cells' neighbours, running heads and page numbers are dropped, columns are read whole,
TeX-style accents are composed, and a page of formulas goes to the model with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from docpipe.config import RenderOptions, RouteOptions
from docpipe.render.document import expand_document
from docpipe.render.text_layer import markdown_table, math_char_count, normalise_chars

AUTO = RouteOptions(text_layer="auto")
PROSE = ("The committee reviewed the quarterly results and found that shipments rose in every region, while "
         "returns fell in all but one. ")


def _pages(path: Path) -> list[dict]:
    return [r for r in expand_document(str(path), RenderOptions(), 600, route=AUTO) if r["kind"] == "page"]


def _grid(page, x0: float, y0: float, rows: list[list[str]], ruled: bool, cw: float = 90, rh: float = 20) -> None:
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            rect = (x0 + c * cw, y0 + r * rh, x0 + (c + 1) * cw, y0 + (r + 1) * rh)
            if ruled:
                page.draw_rect(rect, color=(0, 0, 0), width=0.5)
            page.insert_text((rect[0] + 4, rect[1] + 14), cell, fontsize=10)


RULED = [["Region", "Q1", "Q2", "Q3"], ["North", "120", "135", "150"], ["South", "98", "101", "117"],
         ["East", "143", "139", "160"]]
UNRULED = [["Item", "Qty", "Price"], ["Bolts M6", "400", "0.12"], ["Nuts M6", "380", "0.05"],
           ["Washers", "1200", "0.01"]]


@pytest.fixture(scope="module")
def pdfs(tmp_path_factory) -> dict[str, Path]:
    import pymupdf

    folder = tmp_path_factory.mktemp("text_layer")
    paths = {}

    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_textbox((72, 72, 523, 200), PROSE * 2, fontsize=11)
    _grid(page, 72, 220, RULED, ruled=True)
    page.insert_textbox((72, 330, 523, 400), "Stock at the depot, counted on Monday:", fontsize=11)
    _grid(page, 72, 410, UNRULED, ruled=False, cw=110)
    page.insert_textbox((72, 520, 523, 700), PROSE, fontsize=11)
    doc.save(folder / "tables.pdf")
    paths["tables"] = folder / "tables.pdf"

    # A header cell spanning two columns, over two sub-headers.
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_textbox((72, 72, 523, 200), PROSE * 2, fontsize=11)
    page.draw_rect((72, 220, 162, 240), color=(0, 0, 0), width=0.5)
    page.insert_text((76, 234), "Region", fontsize=10)
    page.draw_rect((162, 220, 342, 240), color=(0, 0, 0), width=0.5)
    page.insert_text((166, 234), "Revenue", fontsize=10)
    for c, cell in enumerate(["", "2025", "2026"]):
        page.draw_rect((72 + c * 90, 240, 162 + c * 90, 260), color=(0, 0, 0), width=0.5)
        page.insert_text((76 + c * 90, 254), cell, fontsize=10)
    for c, cell in enumerate(["North", "120", "150"]):
        page.draw_rect((72 + c * 90, 260, 162 + c * 90, 280), color=(0, 0, 0), width=0.5)
        page.insert_text((76 + c * 90, 274), cell, fontsize=10)
    doc.save(folder / "spans.pdf")
    paths["spans"] = folder / "spans.pdf"

    doc = pymupdf.open()
    for n in range(3):
        page = doc.new_page(width=595, height=842)
        page.insert_text((72, 40), "Journal of Reproducible Results, Vol. 12 (2026)", fontsize=9)
        page.insert_text((292, 815), str(n + 1), fontsize=9)
        page.insert_textbox((72, 90, 523, 760), f"Part {n + 1} begins here. " + PROSE * 8, fontsize=11)
    doc.save(folder / "running.pdf")
    paths["running"] = folder / "running.pdf"

    # Two columns of two paragraphs each, the paragraphs of both columns at the same heights: sorting blocks by
    # height alone would read left 1, right 1, left 2, right 2.
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_text((72, 70), "Field notes", fontsize=18)
    for x0, side in ((72, "Left"), (310, "Right")):
        for k, y0 in enumerate((100, 300), 1):
            body = f"{side} column, paragraph {k}, starts. " + "Samples were dried and weighed twice. " * 6 + \
                f"{side} column, paragraph {k}, ends."
            page.insert_textbox((x0, y0, x0 + 213, y0 + 180), body, fontsize=10)
    doc.save(folder / "columns.pdf")
    paths["columns"] = folder / "columns.pdf"

    # TeX's way with accents (a spacing accent glyph beside its letter), doubled quotes and ligatures.
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_font(fontname="F0", fontbuffer=pymupdf.Font("tiro").buffer)
    page.insert_textbox((72, 72, 523, 300), "J´an Min´aˇc and Fran¸cois M¨uller wrote the ‘‘ﬁnal’’ report on "
                        "the ﬂow of the river. " + PROSE, fontsize=11, fontname="F0")
    doc.save(folder / "accents.pdf")
    paths["accents"] = folder / "accents.pdf"

    # A page of formulas (set in the Symbol font, as math fonts set them), then a page of prose.
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_textbox((72, 72, 523, 140), "The energy of the system is bounded as follows. " * 2, fontsize=11)
    for k in range(6):
        page.insert_text((120, 170 + 40 * k), f"S a{k} b{k} < g + d{k} = p", fontsize=14, fontname="symb")
    page = doc.new_page(width=595, height=842)
    page.insert_textbox((72, 72, 523, 400), PROSE * 4, fontsize=11)
    doc.save(folder / "formulas.pdf")
    paths["formulas"] = folder / "formulas.pdf"
    return paths


def test_ruled_and_unruled_tables_keep_their_cells_neighbours(pdfs):
    [page] = _pages(pdfs["tables"])
    text = page["text"]
    assert page["text_source"] == "text_layer"
    ruled = ("| Region | Q1 | Q2 | Q3 |\n|---|---|---|---|\n| North | 120 | 135 | 150 |\n| South | 98 | 101 | 117 |\n"
             "| East | 143 | 139 | 160 |")
    unruled = ("| Item | Qty | Price |\n|---|---|---|\n| Bolts M6 | 400 | 0.12 |\n| Nuts M6 | 380 | 0.05 |\n"
               "| Washers | 1200 | 0.01 |")
    assert ruled in text and unruled in text
    # in reading order, between the paragraphs that surround them
    assert text.index("returns fell") < text.index(ruled) < text.index("Stock at the depot") < text.index(unruled)
    assert text.rstrip().endswith("returns fell in all but one.")


def test_a_header_cell_spanning_columns_is_joined_into_each_column_header(pdfs):
    """Only header cells span: a Markdown table says which header is over each cell ("Revenue 2025"); a body cell
    that spans makes an HTML table (tests/test_text_structure.py)."""
    [page] = _pages(pdfs["spans"])
    assert "| Region | Revenue 2025 | Revenue 2026 |\n|---|---|---|\n| North | 120 | 150 |" in page["text"]


def test_running_head_and_page_numbers_are_dropped_from_every_page(pdfs):
    pages = _pages(pdfs["running"])
    assert [p["text_source"] for p in pages] == ["text_layer"] * 3
    for n, page in enumerate(pages, 1):
        lines = page["text"].splitlines()
        assert lines[0].startswith(f"Part {n} begins here. The committee"), lines[0]
        assert "Journal of Reproducible Results" not in page["text"]
        assert not any(line.strip() in ("1", "2", "3") for line in lines)
        assert page["text"].rstrip().endswith("returns fell in all but one.")


def test_a_page_number_alone_is_dropped_even_on_a_single_page():
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_textbox((72, 90, 523, 760), PROSE * 3, fontsize=11)
    page.insert_text((280, 815), "- 17 -", fontsize=9)
    from docpipe.render.text_layer import page_markdown

    assert page_markdown(page) == (PROSE * 3).strip()


def test_two_columns_are_read_whole_and_in_order(pdfs):
    [page] = _pages(pdfs["columns"])
    text = page["text"]
    paragraphs = [f"{side} column, paragraph {k}, starts. " + "Samples were dried and weighed twice. " * 6
                  + f"{side} column, paragraph {k}, ends." for side in ("Left", "Right") for k in (1, 2)]
    assert text.startswith("# Field notes\n\n")
    assert text.split("\n\n")[1:] == paragraphs


def test_tex_style_accents_ligatures_and_quotes_come_out_composed(pdfs):
    [page] = _pages(pdfs["accents"])
    assert page["text"].startswith("Ján Mináč and François Müller wrote the “final” report on the flow of the "
                                   "river.")
    # an accent with no letter after it joins the one before
    assert normalise_chars("caf´e e´te´ na¨ıve") == "café été naïve"
    assert normalise_chars("a\u0301") == "á"  # combining marks composed (NFC)
    assert normalise_chars("x^2 and ~/path, `code`") == "x^2 and ~/path, `code`"  # ASCII look-alikes kept


def test_a_page_of_formulas_goes_to_the_model_with_its_reason(pdfs):
    formulas, prose = _pages(pdfs["formulas"])
    assert (formulas.get("text_source"), formulas["route_reason"]) == (None, "formulas")
    assert formulas["image"] and formulas.get("text") is None
    assert (prose["text_source"], prose["route_reason"]) == ("text_layer", "trusted")
    assert prose["text"].startswith("The committee reviewed")


def test_formula_characters_by_font_and_symbol():
    assert math_char_count("x_i + y", "ABCDEF+CMMI10") == 3  # a math font's letters and digits
    assert math_char_count("• . . . . {}", "CMSY10") == 0  # LaTeX's list bullets and dot leaders are not formulas
    assert math_char_count("∑∫≤ and a + b = c", "Times-Roman") == 3  # math symbols beyond prose's
    assert math_char_count("5 % of 3 × 4 − 1", "Helvetica") == 0


def test_markdown_table_escapes_pipes():
    assert markdown_table([["a|b", "c"], ["1", "2\n3"]]) == "| a\\|b | c |\n|---|---|\n| 1 | 2 3 |"


def test_numbered_first_lines_and_code_lines_are_body_text_not_running_heads():
    import pymupdf

    from docpipe.render.text_layer import RunningLines, page_markdown

    doc = pymupdf.open()
    for n in range(1, 4):
        page = doc.new_page(width=595, height=842)
        page.insert_text((72, 50), f"Question {n}: describe the process.", fontsize=11)
        page.insert_text((72, 70), "}", fontsize=11, fontname="cour")  # a code listing's line, on every page
        page.insert_textbox((72, 120, 523, 700), PROSE * 4, fontsize=11)
        page.insert_text((480, 815), f"Page {n} of 3", fontsize=9)  # a real footer: its number steps with the page
    doc = pymupdf.open("pdf", doc.tobytes())
    running = RunningLines(doc)
    for n in range(1, 4):
        lines = page_markdown(doc.load_page(n - 1), running=running).splitlines()
        assert f"Question {n}: describe the process." in lines
        assert "}" in lines
        assert not any("Page" in line for line in lines)


def test_numbers_in_tables_and_beside_text_in_the_bottom_band_are_kept():
    import pymupdf

    from docpipe.render.text_layer import page_markdown

    # a ruled table whose totals row lies in the bottom band
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_textbox((72, 72, 523, 600), PROSE * 6, fontsize=11)
    _grid(page, 72, 660, [["Item", "Qty", "Price"], ["Apples", "3", "12"], ["Pears", "5", "20"], ["Plums", "7", "9"],
                          ["Total", "15", "41"]], ruled=True, rh=24)
    assert page_markdown(page).endswith("| Plums | 7 | 9 |\n| Total | 15 | 41 |")

    # an unruled table whose total, 42, is centred in the bottom band; a 7 alone, neither centred nor in a corner;
    # a sum on its label's row
    page = doc.new_page(width=595, height=842)
    page.insert_textbox((72, 72, 523, 600), PROSE * 6, fontsize=11)
    _grid(page, 200, 700, [["Item", "Amount"], ["Rent", "20"], ["Fees", "22"], ["Total", "42"]], ruled=False, cw=100)
    page.insert_text((400, 800), "7", fontsize=11)
    page.insert_text((72, 830), "Amount due", fontsize=11)
    page.insert_text((480, 830), "64", fontsize=11)
    text = page_markdown(page)
    assert "| Fees | 22 |\n| Total | 42 |" in text
    assert "\n\n7\n\n" in text and text.endswith("Amount due 64")


def test_page_numbers_read_as_numbers_or_valid_roman_numerals_of_one_case():
    from docpipe.render.text_layer import PAGE_NUMBER

    for text in ("3", "- 17 -", "Page 2 of 9", "xii", "XXXIV", "iv", "p. 4", "(ix)"):
        assert PAGE_NUMBER.match(text), text
    for text in ("Civil", "ill", "CLI", "Mix", "Xii", "iiii", "vx", "mild", ""):
        assert not PAGE_NUMBER.match(text), text
