"""The structure of text-layer pages, on PDFs drawn here: furniture found on a page alone (gone from the text, kept
in the blocks with its kind), tables that keep each cell's header and row label, tables found the way a reader sees
them (unruled, booktabs, side by side, beside a chart, set sideways, continued from the page before), headings by
size and weight, captions and bullets, the displayed frame, CJK prose, and a cost linear in the page's words."""

from __future__ import annotations

import pymupdf
import pytest

from docpipe.render.text_layer import RunningLines, mostly_right_to_left, page_markdown
from docpipe.schemas import FURNITURE

PROSE = ("The committee reviewed the quarterly results and found that shipments rose in every region, while "
         "returns fell in all but one. ")
A4 = (595, 842)


def _page(doc=None):
    doc = doc if doc is not None else pymupdf.open()
    return doc, doc.new_page(width=A4[0], height=A4[1])


def _rows(page, rows: list[list[str]], xs: list[float], y0: float, rh: float = 16, size: float = 10,
          bold_rows: tuple = ()) -> None:
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell:
                page.insert_text((xs[c], y0 + r * rh), cell, fontsize=size,
                                 fontname="hebo" if r in bold_rows else "helv")


def _reopened(doc):
    return pymupdf.open("pdf", doc.tobytes())


def _blocks(md, kind: str) -> list[dict]:
    return [b for b in md.blocks if b["kind"] == kind]


def _table_rows(md) -> list[list[str]]:
    """The Markdown tables' rows, header first, as cell lists."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


# --- furniture on one page ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def furniture_pages():
    """Three one-page documents, each with its furniture, and body text in the bands that must stay."""
    pages = []
    doc, page = _page()
    page.insert_text((72, 40), "Journal of Applied Things · www.applied-things.org", fontsize=8)
    page.insert_textbox((72, 90, 523, 700), PROSE * 12, fontsize=11)
    page.insert_text((72, 790), "March 2024 | Volume 8 | Issue 3 | e2748", fontsize=8)
    page.insert_text((294, 822), "3", fontsize=9)
    pages.append(_reopened(doc)[0])

    doc, page = _page()
    page.insert_text((72, 30), "Downloaded from journals.example.org at 6:51 on 3 May 2024", fontsize=7)
    # a paragraph whose first line lies in the top band: body text
    page.insert_textbox((72, 70, 523, 700), "The first line of this paragraph starts high on the page. " + PROSE * 10,
                        fontsize=11)
    page.insert_text((72, 800), "Download date: 28 Dec 2018", fontsize=8)
    page.insert_text((470, 820), "Page 3 of 12", fontsize=8)
    pages.append(_reopened(doc)[0])

    doc, page = _page()
    page.insert_textbox((72, 72, 523, 640), PROSE * 10, fontsize=11)
    page.insert_text((72, 765), "Figure 2: Yield by site, 2024.", fontsize=9)  # a caption in the bottom band
    page.insert_text((72, 785), "1 The data are at https://data.example.org/yield.", fontsize=8)  # a footnote
    page.insert_text((72, 812), "Rev. C · P/N 1234-567 · 2024-05-01", fontsize=7)
    page.insert_text((72, 826), "Confidential: do not distribute", fontsize=7)
    pages.append(_reopened(doc)[0])
    return [page_markdown(p) for p in pages]


def test_furniture_of_a_one_page_document_leaves_the_text_and_keeps_its_kind_in_the_blocks(furniture_pages):
    journal, stamped, datasheet = furniture_pages
    expected = [
        (journal, [("page_header", "Journal of Applied Things · www.applied-things.org"),
                   ("page_footer", "March 2024 | Volume 8 | Issue 3 | e2748"), ("page_number", "3")]),
        (stamped, [("page_header", "Downloaded from journals.example.org at 6:51 on 3 May 2024"),
                   ("page_footer", "Download date: 28 Dec 2018"), ("page_number", "Page 3 of 12")]),
        (datasheet, [("page_footer", "Rev. C · P/N 1234-567 · 2024-05-01"),
                     ("page_footer", "Confidential: do not distribute")]),
    ]
    for md, furniture in expected:
        assert sorted((b["kind"], b["text"]) for b in md.blocks if b["kind"] in FURNITURE) == sorted(furniture)
        for _, text in furniture:
            assert text not in md
        assert md.startswith(("The committee", "The first line")) and md.rstrip().endswith(
            ("all but one.", "yield.")), md[-80:]
        # the text is the non-furniture blocks, in reading order
        assert md == "\n\n".join(b["text"] for b in md.blocks if b["kind"] not in FURNITURE)


def test_body_text_in_the_margin_bands_stays(furniture_pages):
    _, stamped, datasheet = furniture_pages
    assert stamped.startswith("The first line of this paragraph starts high on the page.")
    assert "Figure 2: Yield by site, 2024." in datasheet
    assert [b["kind"] for b in datasheet.blocks if b["text"].startswith("Figure 2")] == ["caption"]
    assert datasheet.rstrip().endswith("1 The data are at https://data.example.org/yield.")


def test_a_word_starting_like_a_revision_mark_does_not_make_a_top_line_furniture():
    """ "revenue" and "reviewed" are not "Rev. C": a lone body line in the top band stays text."""
    line = "Quarterly report: revenue grew and the board reviewed the plan."
    doc, page = _page()
    page.insert_text((72, 72), line)
    md = page_markdown(_reopened(doc)[0])
    assert md == line and [b["kind"] for b in md.blocks] == ["paragraph"]


# --- tables ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tables():
    """One page per table kind, converted once."""
    out = {}
    # unruled, a group header over three years underlined by a rule, an empty corner, group rows, figures with
    # their share in parentheses
    doc, page = _page()
    page.insert_textbox((72, 72, 523, 200), PROSE * 2, fontsize=11)
    page.insert_text((300, 230), "Year Ended", fontsize=10, fontname="hebo")
    page.draw_line((200, 234), (480, 234), width=0.5)
    _rows(page, [["", "2021", "2022", "2023"], ["Revenue", "1,200", "1,350", "2,862 (4.7)"],
                 ["Cost", "900", "950", "1,000"], ["Operating expenses", "", "", ""], ["Staff", "300", "310", "320"],
                 ["Rent", "100", "100", "110"]], [76, 210, 310, 410], 248, bold_rows=(0,))
    page.insert_textbox((72, 380, 523, 500), PROSE * 3, fontsize=11)
    out["grouped"] = page_markdown(_reopened(doc)[0])

    # ruled, a row label spanning two rows: HTML with the header cells as <th>
    doc, page = _page()
    page.insert_textbox((72, 72, 523, 200), PROSE * 2, fontsize=11)
    grid = [((72, 220, 162, 240), "Region"), ((162, 220, 252, 240), "Year"), ((252, 220, 342, 240), "Units"),
            ((72, 240, 162, 280), "North"), ((162, 240, 252, 260), "2025"), ((252, 240, 342, 260), "120"),
            ((162, 260, 252, 280), "2026"), ((252, 260, 342, 280), "150"),
            ((72, 280, 162, 300), "South"), ((162, 280, 252, 300), "2025"), ((252, 280, 342, 300), "98")]
    for rect, text in grid:
        page.draw_rect(rect, color=(0, 0, 0), width=0.5)
        page.insert_text((rect[0] + 4, rect[1] + 14), text, fontsize=10)
    out["rowspan"] = page_markdown(_reopened(doc)[0])

    # booktabs: three horizontal rules, no vertical ones, with its caption above in bold
    doc, page = _page()
    page.insert_textbox((72, 72, 523, 200), PROSE * 3, fontsize=11)
    page.insert_text((72, 222), "Table 2: Shipments by region", fontsize=11, fontname="hebo")
    page.draw_line((72, 232), (400, 232), width=1)
    _rows(page, [["Region", "Q1", "Q2", "Q3"], ["North", "120", "135", "150"], ["South", "98", "101", "117"],
                 ["East", "143", "139", "160"], ["West", "88", "90", "95"]], [76, 180, 260, 340], 246)
    page.draw_line((72, 250), (400, 250), width=0.5)
    page.draw_line((72, 314), (400, 314), width=1)
    page.insert_textbox((72, 340, 523, 500), PROSE * 3, fontsize=11)
    out["booktabs"] = page_markdown(_reopened(doc)[0])

    # two tables side by side, each under its own header
    doc, page = _page()
    page.insert_textbox((72, 72, 523, 200), PROSE * 2, fontsize=11)
    _rows(page, [["Name", "Age"], ["Ann", "31"], ["Bob", "45"], ["Cy", "27"]], [72, 150], 240)
    _rows(page, [["City", "Pop."], ["Oslo", "709"], ["Bergen", "291"], ["Trondheim", "212"]], [330, 430], 240)
    page.insert_textbox((72, 330, 523, 500), PROSE * 3, fontsize=11)
    out["side_by_side"] = page_markdown(_reopened(doc)[0])

    # a bar chart whose labels sit on the rows of the table beside it
    doc, page = _page()
    page.insert_textbox((72, 72, 523, 150), PROSE * 2, fontsize=11)
    for i, (label, h) in enumerate([("Jan", 60), ("Feb", 90), ("Mar", 40), ("Apr", 75)]):
        page.draw_rect((110, 190 + i * 20, 110 + h, 202 + i * 20), color=None, fill=(0.2, 0.4, 0.7))
        page.insert_text((76, 200 + i * 20), label, fontsize=9)
    page.draw_line((108, 185), (108, 275), width=0.8)
    _rows(page, [["Month", "Units", "Share"], ["Jan", "600", "23%"], ["Feb", "900", "34%"], ["Mar", "400", "15%"],
                 ["Apr", "750", "28%"]], [300, 370, 440], 180, rh=20, size=9)
    page.insert_text((76, 300), "Figure 1: Units by month", fontsize=9)
    page.insert_textbox((72, 320, 523, 420), PROSE * 2, fontsize=11)
    out["chart"] = page_markdown(_reopened(doc)[0])

    # a paragraph beside an unruled table, its lines on the table's rows
    doc, page = _page()
    page.insert_textbox((72, 72, 523, 150), PROSE * 2, fontsize=11)
    _rows(page, [["Item", "Qty", "Price"], ["Bolts", "400", "0.12"], ["Nuts", "380", "0.05"],
                 ["Washers", "1200", "0.01"], ["Screws", "90", "0.20"]], [72, 150, 210], 180)
    page.insert_textbox((300, 168, 523, 300), "The depot counted its stock on Monday and found that bolts and nuts "
                        "were plentiful while screws ran low.", fontsize=10)
    page.insert_textbox((72, 320, 523, 420), PROSE * 2, fontsize=11)
    out["prose_beside"] = page_markdown(_reopened(doc)[0])

    # a landscape table set sideways on a portrait page
    src, wide = pymupdf.open(), None
    wide = src.new_page(width=842, height=595)
    wide.insert_text((72, 60), "Table 4: Shipments by region and quarter", fontsize=11)
    for y in (78, 98, 180):
        wide.draw_line((72, y), (700, y))
    _rows(wide, [["Region", "Q1", "Q2", "Q3", "Q4"]], [76 + c * 120 for c in range(5)], 92)
    _rows(wide, [["North", "120", "135", "150", "161"], ["South", "98", "101", "117", "120"],
                 ["East", "143", "139", "160", "171"], ["West", "88", "90", "95", "99"]],
          [76 + c * 120 for c in range(5)], 116, rh=18)
    doc, page = _page()
    page.show_pdf_page(page.rect, src, 0, rotate=90)
    sideways = _reopened(doc)
    out["sideways"] = page_markdown(sideways[0])
    out["pages"] = {"sideways": sideways[0], "doc": sideways}
    return out


def test_a_group_header_is_joined_into_each_column_header_and_group_rows_stay(tables):
    md = tables["grouped"]
    assert md.analysis == "layout"
    assert _table_rows(md) == [
        ["", "Year Ended 2021", "Year Ended 2022", "Year Ended 2023"], ["Revenue", "1,200", "1,350", "2,862 (4.7)"],
        ["Cost", "900", "950", "1,000"], ["Operating expenses", "", "", ""], ["Staff", "300", "310", "320"],
        ["Rent", "100", "100", "110"]]
    assert [b["kind"] for b in md.blocks] == ["paragraph", "table", "paragraph"]


def test_a_body_cell_spanning_rows_makes_an_html_table_with_header_cells(tables):
    assert ('<table>\n<tr><th>Region</th><th>Year</th><th>Units</th></tr>\n'
            '<tr><td rowspan="2">North</td><td>2025</td><td>120</td></tr>\n<tr><td>2026</td><td>150</td></tr>\n'
            '<tr><td>South</td><td>2025</td><td>98</td></tr>\n</table>') in tables["rowspan"]


def test_booktabs_side_by_side_prose_beside_and_chart_tables_keep_each_cell_in_its_row_and_column(tables):
    assert _table_rows(tables["booktabs"]) == [["Region", "Q1", "Q2", "Q3"], ["North", "120", "135", "150"],
                                               ["South", "98", "101", "117"], ["East", "143", "139", "160"],
                                               ["West", "88", "90", "95"]]
    # its bold caption is a caption, not a heading
    assert "\n\nTable 2: Shipments by region\n\n| Region" in tables["booktabs"]
    assert _blocks(tables["booktabs"], "caption")[0]["text"] == "Table 2: Shipments by region"
    side = tables["side_by_side"]
    assert _table_rows(side) == [["Name", "Age"], ["Ann", "31"], ["Bob", "45"], ["Cy", "27"],
                                 ["City", "Pop."], ["Oslo", "709"], ["Bergen", "291"], ["Trondheim", "212"]]
    assert len(_blocks(side, "table")) == 2
    beside = tables["prose_beside"]
    assert _table_rows(beside) == [["Item", "Qty", "Price"], ["Bolts", "400", "0.12"], ["Nuts", "380", "0.05"],
                                   ["Washers", "1200", "0.01"], ["Screws", "90", "0.20"]]
    assert "\n\nThe depot counted its stock on Monday and found that bolts and nuts were plentiful while screws ran " \
           "low.\n\n" in beside
    chart = tables["chart"]
    assert _table_rows(chart) == [["Month", "Units", "Share"], ["Jan", "600", "23%"], ["Feb", "900", "34%"],
                                  ["Mar", "400", "15%"], ["Apr", "750", "28%"]]
    assert _blocks(chart, "caption")[0]["text"] == "Figure 1: Units by month"


def test_a_table_set_sideways_is_turned_and_its_box_is_the_pages(tables):
    md, md_page = tables["sideways"], tables["pages"]
    assert _table_rows(md) == [["Region", "Q1", "Q2", "Q3", "Q4"], ["North", "120", "135", "150", "161"],
                               ["South", "98", "101", "117", "120"], ["East", "143", "139", "160", "171"],
                               ["West", "88", "90", "95", "99"]]
    assert md.startswith("Table 4: Shipments by region and quarter\n\n|")
    [table] = _blocks(md, "table")
    # on the portrait page the table stands on its side (taller than wide), and each box is where its text is drawn
    assert table["y1"] - table["y0"] > 2 * (table["x1"] - table["x0"])
    [caption] = _blocks(md, "caption")
    for block, text in ((caption, "Table 4"), (table, "North"), (table, "99")):
        drawn = md_page["sideways"].search_for(text)[0]
        x, y = (drawn.x0 + drawn.x1) / 2 / A4[0], (drawn.y0 + drawn.y1) / 2 / A4[1]
        assert block["x0"] <= x <= block["x1"] and block["y0"] <= y <= block["y1"], (text, block, drawn)


def test_a_table_continued_from_the_page_before_gets_no_header_from_its_data():
    doc = pymupdf.open()
    page = doc.new_page(width=A4[0], height=A4[1])
    page.insert_textbox((72, 72, 523, 500), PROSE * 8, fontsize=11)
    rows = [["Region", "Q1", "Q2"], *[[f"Site {n}", f"{100 + n}", f"{200 + n}"] for n in range(1, 12)]]
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            page.draw_rect((72 + c * 120, 540 + r * 20, 192 + c * 120, 560 + r * 20), color=(0, 0, 0), width=0.5)
            page.insert_text((76 + c * 120, 554 + r * 20), cell, fontsize=10)
    page = doc.new_page(width=A4[0], height=A4[1])
    for r in range(8):
        for c, cell in enumerate([f"Site {12 + r}", f"{112 + r}", f"{212 + r}"]):
            page.draw_rect((72 + c * 120, 72 + r * 20, 192 + c * 120, 92 + r * 20), color=(0, 0, 0), width=0.5)
            page.insert_text((76 + c * 120, 86 + r * 20), cell, fontsize=10)
    page.insert_textbox((72, 300, 523, 500), PROSE * 3, fontsize=11)
    doc = _reopened(doc)
    first, second = (page_markdown(p) for p in doc)
    assert _table_rows(first)[:2] == [["Region", "Q1", "Q2"], ["Site 1", "101", "201"]]
    assert second.startswith("|  |  |  |\n|---|---|---|\n| Site 12 | 112 | 212 |\n")


def test_a_printed_spreadsheet_is_read_in_time_linear_in_its_words(monkeypatch):
    """100 x 20 ruled cells: each word is placed by two bisections (the old conversion scanned every word for every
    cell, 4 million tests here; a 400 x 25 sheet ran past the page time limit)."""
    from docpipe.render import tables

    doc = pymupdf.open()
    page = doc.new_page(width=20 * 40 + 40, height=100 * 10 + 40)
    for r in range(101):
        page.draw_line((20, 20 + r * 10), (820, 20 + r * 10), width=0.3)
    for c in range(21):
        page.draw_line((20 + c * 40, 20), (20 + c * 40, 1020), width=0.3)
    writer = pymupdf.TextWriter(page.rect)  # one text object: 2,000 insert_text calls take long to build
    for r in range(100):
        for c in range(20):
            writer.append((22 + c * 40, 28 + r * 10), f"{r}.{c}", fontsize=6)
    writer.write_text(page)
    calls = []
    slot = tables._slot
    monkeypatch.setattr(tables, "_slot", lambda edges, v: calls.append(1) or slot(edges, v))
    md = page_markdown(_reopened(doc)[0])
    assert len(calls) == 2 * 100 * 20  # a row and a column per word, nothing per cell
    rows = _table_rows(md)
    assert rows[0] == [""] * 20  # no header row: its first row reads like the rows under it
    assert rows[1][:3] == ["0.0", "0.1", "0.2"] and rows[100][19] == "99.19" and len(rows) == 101


# --- headings, captions, lists, scripts, frames -----------------------------------------------------------------


def test_heading_levels_by_size_then_weight_and_captions_and_bullets():
    doc, page = _page()
    page.insert_text((72, 72), "Annual Report", fontsize=20, fontname="hebo")
    page.insert_text((72, 110), "Overview", fontsize=13.4, fontname="hebo")
    page.insert_textbox((72, 120, 523, 220), PROSE * 3, fontsize=12)
    page.insert_text((72, 240), "Details of the method", fontsize=12, fontname="hebo")
    page.insert_textbox((72, 250, 523, 350), PROSE * 3, fontsize=12)
    page.insert_text((72, 370), "Table 2: Shipments by region", fontsize=12, fontname="hebo")
    page.insert_text((72, 390), "Source: company filings", fontsize=10)
    page.insert_htmlbox((72, 410, 523, 600), "<ul><li>first point of the list</li><li>second point, which is longer "
                        "and goes on past the end of its line to wrap onto the next one below it</li><li>third point"
                        "</li></ul><ol><li>one</li><li>two</li></ol>", css="* {font-size: 12pt}")
    page.insert_text((72, 640), "A bold sentence at the body's size is not a heading.", fontsize=12, fontname="hebo")
    md = page_markdown(_reopened(doc)[0])
    assert md.analysis == "fast"
    assert [(b["kind"], b["text"][:25]) for b in md.blocks] == [
        ("heading", "# Annual Report"), ("heading", "## Overview"), ("paragraph", "The committee reviewed th"),
        ("heading", "### Details of the method"), ("paragraph", "The committee reviewed th"),
        ("caption", "Table 2: Shipments by reg"), ("caption", "Source: company filings"),
        ("list_item", "- first point of the list"), ("list_item", "- second point, which is "),
        ("list_item", "- third point"), ("list_item", "1. one"), ("list_item", "2. two"),
        ("paragraph", "A bold sentence at the bo")]
    assert "- second point, which is longer and goes on past the end of its line to wrap onto the next one below " \
           "it" in md


def test_two_columns_of_cjk_prose_are_prose_not_a_table():
    text = "这是一个关于中文排版的测试段落，用于检查两栏布局是否被误认为表格。" * 6
    doc, page = _page()
    page.insert_textbox((72, 72, 290, 700), text, fontsize=11, fontname="china-s")
    page.insert_textbox((310, 72, 523, 700), text, fontsize=11, fontname="china-s")
    md = page_markdown(_reopened(doc)[0])
    assert "|" not in md and [b["kind"] for b in md.blocks] == ["paragraph", "paragraph"]
    assert md.blocks[0]["x1"] < 0.5 < md.blocks[1]["x0"]
    # each column wraps over several lines; joined with no space between the characters, it reads as written
    assert [b["text"] for b in md.blocks] == [text, text]


def test_korean_lines_are_joined_by_a_space_and_latin_beside_han_too():
    doc, page = _page()
    page.insert_text((72, 80), "한국어 문장은 단어 사이에", fontsize=11, fontname="korea")
    page.insert_text((72, 95), "띄어쓰기를 합니다.", fontsize=11, fontname="korea")
    page.insert_text((72, 140), "数据集名为", fontsize=11, fontname="china-s")
    page.insert_text((72, 155), "OCRBench 的测试。", fontsize=11, fontname="china-s")
    md = page_markdown(_reopened(doc)[0])
    assert [b["text"] for b in md.blocks] == ["한국어 문장은 단어 사이에 띄어쓰기를 합니다.",
                                              "数据集名为 OCRBench 的测试。"]


def test_a_page_shown_by_rotate_90_reads_as_the_same_page_stored_upright():
    upright, page = _page()
    page.insert_text((72, 60), "Field notes", fontsize=18)
    for x0, side in ((72, "Left"), (310, "Right")):
        page.insert_textbox((x0, 100, x0 + 213, 700), f"{side} column. " + PROSE * 6, fontsize=10)
    page.insert_text((294, 822), "7", fontsize=9)
    turned = pymupdf.open()
    stored = turned.new_page(width=A4[1], height=A4[0])  # stored landscape, shown portrait
    stored.show_pdf_page(stored.rect, upright, 0, rotate=90)
    stored.set_rotation(90)
    turned = _reopened(turned)
    assert turned[0].rotation == 90 and turned[0].get_pixmap(dpi=20).samples == page.get_pixmap(dpi=20).samples
    want, got = page_markdown(_reopened(upright)[0]), page_markdown(turned[0])
    assert got == want and want.startswith("# Field notes\n\nLeft column.") and "\n\n7" not in want
    assert [b["kind"] for b in got.blocks] == [b["kind"] for b in want.blocks]
    for a, b in zip(got.blocks, want.blocks):
        assert all(abs(a[k] - b[k]) < 0.01 for k in ("x0", "y0", "x1", "y1")), (a, b)


def test_running_lines_of_rotated_pages_are_found_across_pages():
    upright = pymupdf.open()
    for n in range(3):
        page = upright.new_page(width=A4[0], height=A4[1])
        page.insert_text((72, 40), "Handbook of field methods", fontsize=9)
        page.insert_textbox((72, 90, 523, 760), f"Part {n + 1}. " + PROSE * 8, fontsize=11)
    turned = pymupdf.open()
    for n in range(3):
        stored = turned.new_page(width=A4[1], height=A4[0])
        stored.show_pdf_page(stored.rect, upright, n, rotate=90)
        stored.set_rotation(90)
    turned = _reopened(turned)
    running = RunningLines(turned)
    for n, page in enumerate(turned):
        md = page_markdown(page, running=running)
        assert md.startswith(f"Part {n + 1}.") and "Handbook" not in md
        assert [b["kind"] for b in md.blocks][0] == "page_header"


def test_right_to_left_text_is_told_by_its_letters():
    assert mostly_right_to_left("مرحبا بالعالم، هذه صفحة 12")
    assert mostly_right_to_left("שלום עולם, זה עמוד אחד (page 1)")
    assert not mostly_right_to_left("An English page that quotes שלום once.")


def test_the_layout_analysis_runs_single_threaded():
    """One onnxruntime thread per session and no spinning: a thread per core cost about twice the CPU per page."""
    import onnxruntime as ort

    from docpipe.render.layout import _analyser

    sessions, seen, todo = [], set(), [_analyser()]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, ort.InferenceSession):
            sessions.append(obj)
        elif type(obj).__module__.startswith("pymupdf.layout"):
            todo += list(vars(obj).values())
    assert len(sessions) >= 3  # the layout, image-feature and table-grid models
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in sessions)


def test_a_document_resumed_after_a_page_skips_the_pages_and_chunk_before_it(tmp_path):
    """The render process restarted after a page cut off at its time limit starts at the page after it: the
    pages before are not yielded again, nor the extraction chunk they share with it (the parent records it)."""
    from docpipe.config import RenderOptions
    from docpipe.render.document import expand_document

    doc = pymupdf.open()
    for n in range(5):
        doc.new_page(width=200, height=200).insert_text((20, 40), f"page {n + 1}")
    pdf = tmp_path / "five.pdf"
    doc.save(pdf)
    recs = list(expand_document(str(pdf), RenderOptions(), 64, ocr=False, chunk_pages=2, first_page=3))
    assert [(r["kind"], r.get("page_number", r.get("chunk_index"))) for r in recs] == [
        ("document", None), ("page", 3), ("page", 4), ("chunk", 1), ("page", 5), ("chunk", 2)]
    recs = list(expand_document(str(pdf), RenderOptions(), 64, ocr=False, chunk_pages=2, first_page=4))
    assert [(r["kind"], r.get("page_number", r.get("chunk_index"))) for r in recs] == [
        ("document", None), ("page", 4), ("page", 5), ("chunk", 2)]
    # under --pages 2,4-: the chunks are those of the selection (2 and 4, then 5), and the process that goes on
    # after page 2 was cut off starts at page 4, the next page wanted
    from docpipe.records import PAGE
    from docpipe.render.isolated import _next_page

    pages = ((2, 2), (4, None))
    recs = list(expand_document(str(pdf), RenderOptions(), 64, ocr=False, chunk_pages=2, pages=pages, first_page=3))
    assert [(r["kind"], r.get("page_number", r.get("chunk_index"))) for r in recs] == [
        ("document", None), ("page", 4), ("page", 5), ("chunk", 1)]
    assert recs[0]["chunk_count"] == 2
    assert _next_page({"page_count": 5}, {PAGE: set()}, pages) == 2
    assert _next_page({"page_count": 5}, {PAGE: {2}}, pages) == 4
    assert _next_page({"page_count": 5}, {PAGE: {2, 4, 5}}, pages) is None
