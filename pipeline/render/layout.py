"""PyMuPDF's layout analysis, for the text-layer pages the rules alone are unsure of (text_layer.needs_layout).

PyMuPDF 2 ships it inside the package (``pymupdf.layout``, its own licence): a graph network over the page's text
boxes and image features (ONNX models run by onnxruntime on the CPU) that groups them into regions of a class
(text, title, section-header, list-item, table, caption, footnote, formula, picture, page-header, page-footer) in
reading order, and a table-grid model that gives each table's rows, columns and spanning cells. pymupdf4llm 2 turns
the same analysis into its own Markdown; here only the regions and grids are taken, and text_layer.py writes them
in our convention from the page's own lines and words.

The analyser is built once per process, with one-thread onnxruntime sessions: the library's default (a thread per
core, spinning while it waits) cost about twice the CPU a page on a 2-core machine, and the render stage already
runs one process per core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# What the analysis calls its regions -> docpipe.schemas.BlockKind
KINDS = {
    "text": "paragraph", "title": "title", "section-header": "heading", "list-item": "list_item", "table": "table",
    "caption": "caption", "footnote": "footnote", "formula": "formula", "picture": "picture",
    "page-header": "page_header", "page-footer": "page_footer",
}
MAX_BOXES = 1500  # text lines above which the analysis is not run (its graph grows with them): the rules alone


@dataclass
class Region:
    """One region the analysis found: its kind (a BlockKind value), box (page points) and, for a table, its grid:
    row and column edges (page points, outer edges included) and the cells that span (row0, row1, col0, col1;
    end exclusive)."""

    kind: str
    bbox: tuple[float, float, float, float]
    rows: list[float] = field(default_factory=list)
    cols: list[float] = field(default_factory=list)
    spans: list[tuple[int, int, int, int]] = field(default_factory=list)


_model = None


def _analyser():
    """The layout model, built on first use with single-threaded sessions (see the module docstring)."""
    global _model
    if _model is None:
        import sys

        import onnxruntime as ort
        from pymupdf.layout import DocumentLayoutAnalyzer

        def make_session(model_path, providers=None):
            so = ort.SessionOptions()
            so.enable_cpu_mem_arena = False  # as the library's own: memory goes back after a large page
            so.intra_op_num_threads = so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return ort.InferenceSession(model_path, sess_options=so, providers=providers)

        # The library makes every session through its modules' make_session: ours while this model is built.
        patched = {name: mod for name, mod in list(sys.modules.items())
                   if name.startswith("pymupdf.layout") and callable(getattr(mod, "make_session", None))}
        saved = {name: mod.make_session for name, mod in patched.items()}
        try:
            for mod in patched.values():
                mod.make_session = make_session
            _model = DocumentLayoutAnalyzer.get_model(n_workers=1, use_sort=True, table_grid_model_ver="V4")
        finally:
            for name, mod in patched.items():
                mod.make_session = saved[name]
    return _model


def analyse(page) -> list[Region]:
    """The page's regions in the analysis' reading order. ``page`` upright (rotation 0): the analysis reads it in
    the unrotated frame."""
    regions = []
    for group in _analyser().predict(page, return_raw=True):
        x0, y0, x1, y1 = (float(v) for v in group["group_bbox"][:4])
        if x1 - x0 <= 1 or y1 - y0 <= 1:
            continue
        region = Region(KINDS.get(group["class_name"], "other"), (x0, y0, x1, y1))
        grid = group.get("table_grid") if region.kind == "table" else None
        if grid is not None:
            region.rows = [y0] + [y0 + float(h) for h in grid.h_lines if 0 < h < y1 - y0] + [y1]
            region.cols = [x0] + [x0 + float(v) for v in grid.v_lines if 0 < v < x1 - x0] + [x1]
            region.spans = sorted({(c.row_start, c.row_end, c.col_start, c.col_end)
                                   for c in group.get("table_cells") or ()
                                   if c.row_end - c.row_start > 1 or c.col_end - c.col_start > 1})
        elif region.kind == "table":
            region.kind = "paragraph"  # a table without a grid: its text, read as lines
        regions.append(region)
    return regions
