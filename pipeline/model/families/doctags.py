"""DocTags (SmolDocling's and granite-docling's output) to our page format: Markdown as the text-layer route writes
it (docs/rendering.md) and the page's layout blocks with their boxes (pages.blocks).

docling-core, the format's own library, parses the tags (``DoclingDocument.load_from_doctags``): element kinds,
OTSL tables with their spans, and each element's ``<loc_>`` box on the 0-500 grid, which it scales by the page
image's size; given no image it scales by 1, so boxes come out as fractions of the page, origin top left, as the
contract keeps them. What we write, element by element:

- title and section headers: ``#`` headings, the page's highest level as ``#`` (as the text layer does);
- text, captions, footnotes: paragraphs; list items: ``- `` items (``1.`` for an ordered list's);
- tables: a Markdown table (first row as header), or an HTML ``<table>`` with rowspan/colspan when a cell spans;
- formulas: LaTeX between ``\\[`` and ``\\]``; code: a fenced block; pictures: a block without text;
- page headers and footers (a number alone: page_number) are furniture: blocks, not text.

Raw output with no element docling-core recognises, or only empty ones (a model that wrote no DocTags), keeps its
text, tags stripped, so a page is never silently empty.
"""

from __future__ import annotations

import re
from typing import Any

from docpipe.schemas import FURNITURE, BlockKind

_TAG = re.compile(r"<[^<>]+>")


def doctags_page(raw: str) -> tuple[str, list[dict[str, Any]] | None]:
    """One page's DocTags as (Markdown, blocks); blocks is None when some element came without a box."""
    from docling_core.types.doc import ContentLayer
    from docling_core.types.doc.document import DoclingDocument, DocTagsDocument

    doctags = raw if "<doctag>" in raw else f"<doctag>{raw}</doctag>"
    doc = DoclingDocument.load_from_doctags(DocTagsDocument.from_doctags_and_image_pairs([doctags], None))
    items = [item for item, _ in doc.iterate_items(included_content_layers=set(ContentLayer))]
    if not items:
        return " ".join(_TAG.sub(" ", raw).split()), None
    depths = [_heading_depth(item) for item in items]
    top = min((d for d in depths if d is not None), default=0)
    blocks, boxed = [], True
    for item, depth in zip(items, depths):
        kind, text = _block(doc, item, None if depth is None else depth - top)
        if kind is None:
            continue
        box = _box(item)
        boxed = boxed and box is not None
        blocks.append({"kind": kind, "text": text, **(box or {})})
    markdown = "\n\n".join(b["text"] for b in blocks if b["kind"] not in FURNITURE and b["text"])
    if not markdown and not any(b["text"] for b in blocks):  # elements without content: keep what was written
        return " ".join(_TAG.sub(" ", raw).split()), None
    return markdown, blocks if boxed else None


def _heading_depth(item) -> int | None:
    label = str(item.label)
    if label == "title":
        return 0
    if label == "section_header":
        return int(getattr(item, "level", 1) or 1)
    return None


def _block(doc, item, depth: int | None) -> tuple[str | None, str]:
    """(kind, Markdown) of one element; kind None for what is no block of its own (a table's cell, say)."""
    label = str(item.label)
    text = " ".join((getattr(item, "text", "") or "").split())
    if depth is not None:
        return (BlockKind.title if label == "title" else BlockKind.heading).value, "#" * min(6, depth + 1) + " " + text
    if label == "table" or label == "document_index":
        return BlockKind.table.value, _table(item.data)
    if label in ("page_header", "page_footer"):
        kind = BlockKind.page_number if re.fullmatch(r"[\divxlcIVXLC]+", text) else BlockKind(label)
        return kind.value, text
    if label == "list_item":
        marker = getattr(item, "marker", "") if getattr(item, "enumerated", False) else ""
        return BlockKind.list_item.value, f"{marker or '-'} {text}"
    if label in ("checkbox_selected", "checkbox_unselected"):
        return BlockKind.list_item.value, f"- [{'x' if label == 'checkbox_selected' else ' '}] {text}"
    if label == "formula":
        return BlockKind.formula.value, f"\\[ {text} \\]" if text else ""
    if label == "code":
        return BlockKind.code.value, f"```\n{getattr(item, 'text', '')}\n```"
    if label in ("picture", "chart"):
        return BlockKind.picture.value, ""
    if label in ("caption", "footnote"):
        return BlockKind(label).value, text
    if label in ("text", "paragraph", "reference"):
        return BlockKind.paragraph.value, text
    return BlockKind.other.value, text


def _table(data) -> str:
    """A table's cells in our convention: written by the text layer's own table writer (render/tables.py)."""
    from docpipe.render.tables import Cell, Table, table_markdown

    placed = sorted({(c.start_row_offset_idx, c.start_col_offset_idx, c.row_span, c.col_span, c.text)
                     for c in data.table_cells})
    if not placed:
        return ""
    cells = [Cell(r, c, rs, cs, text) for r, c, rs, cs, text in placed]
    return table_markdown(Table((0.0, 0.0, 0.0, 0.0), data.num_rows, data.num_cols, cells))


def _box(item) -> dict[str, float] | None:
    if not item.prov:
        return None
    b = item.prov[0].bbox
    clamp = lambda v: min(1.0, max(0.0, float(v)))  # noqa: E731
    x0, x1 = sorted((clamp(b.l), clamp(b.r)))
    y0, y1 = sorted((clamp(b.t), clamp(b.b)))
    return {"x0": x0, "y0": y0, "x1": x1, "y1": y1}


def blocks_to_doctags(blocks: list[dict[str, Any]]) -> str:
    """A page's blocks (as pages.blocks holds them) written back as DocTags, what a DocTags model learns to answer
    in fine-tuning: docling-core builds the document (boxes on a page of size 1, so its 0-500 grid is the
    fraction's) and exports it, tables as OTSL with their spans."""
    from docling_core.types.doc import (BoundingBox, CoordOrigin, DocItemLabel, DoclingDocument, ProvenanceItem,
                                        Size, TableCell, TableData)

    from docpipe.model.families.markdown import table_cells

    doc = DoclingDocument(name="page")
    doc.add_page(page_no=1, size=Size(width=1, height=1))
    for block in blocks:
        text, kind = block["text"], block["kind"]
        box = BoundingBox(l=block["x0"], t=block["y0"], r=block["x1"], b=block["y1"], coord_origin=CoordOrigin.TOPLEFT)
        prov = ProvenanceItem(page_no=1, bbox=box, charspan=(0, len(text)))
        if kind == BlockKind.title.value:
            doc.add_title(text=text.lstrip("#").strip(), prov=prov)
        elif kind == BlockKind.heading.value:
            level = len(text) - len(text.lstrip("#"))
            doc.add_heading(text=text.lstrip("#").strip(), level=max(1, level), prov=prov)
        elif kind == BlockKind.table.value:
            placed = table_cells(text)
            cells = [TableCell(text=t, start_row_offset_idx=r, end_row_offset_idx=r + rs, start_col_offset_idx=c,
                               end_col_offset_idx=c + cs, row_span=rs, col_span=cs) for r, c, rs, cs, t in placed]
            rows = max((r + rs for r, _, rs, _, _ in placed), default=0)
            cols = max((c + cs for _, c, _, cs, _ in placed), default=0)
            doc.add_table(data=TableData(num_rows=rows, num_cols=cols, table_cells=cells), prov=prov)
        elif kind == BlockKind.list_item.value:
            doc.add_list_item(text=re.sub(r"^(?:[-*+]|\d+[.)])\s+", "", text), prov=prov)
        elif kind == BlockKind.formula.value:
            doc.add_text(label=DocItemLabel.FORMULA, text=text.removeprefix("\\[").removesuffix("\\]").strip(),
                         prov=prov)
        elif kind == BlockKind.code.value:
            doc.add_code(text=re.sub(r"^```[^\n]*\n|\n?```$", "", text), prov=prov)
        elif kind == BlockKind.picture.value:
            doc.add_picture(prov=prov)
        elif kind in FURNITURE:
            label = DocItemLabel.PAGE_HEADER if kind == BlockKind.page_header.value or (
                kind == BlockKind.page_number.value and block["y0"] < 0.5) else DocItemLabel.PAGE_FOOTER
            doc.add_text(label=label, text=text, prov=prov)
        else:
            label = {BlockKind.caption.value: DocItemLabel.CAPTION,
                     BlockKind.footnote.value: DocItemLabel.FOOTNOTE}.get(kind, DocItemLabel.TEXT)
            doc.add_text(label=label, text=text, prov=prov)
    return doc.export_to_doctags()
