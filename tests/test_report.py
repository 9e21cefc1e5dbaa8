"""docpipe report: a real run's output (local executor, tiny model) turned into a site and read back in headless
Chromium: the counts, a document's page images and text, a validation error at its field, and markup from the
documents (a file name, page text, a JSON value) staying text."""

import ast
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docpipe.tools.report import choose_full_views, json_tree
from tests.bad_inputs import CORPUS
from tests.conftest import run_cli

HOSTILE_NAME = '<img src=x onerror="window.pwned=1">.png'
HOSTILE_TEXT = ("<script>window.pwned=2</script><b>not bold</b>\n\n"
                "| Region | Q1 |\n|---|---|\n| <i>North</i> | 120 |\n")
HOSTILE_VALUE = "<script>window.pwned=3</script>"
BAD = ["empty.pdf", "encrypted.pdf", "notes.txt", "truncated.pdf", "multi.tiff"]


def _second_frame_cut() -> bytes:
    """A 2-page TIFF whose second frame's pixel data is cut short: page 1 renders, page 2 fails."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    frames = [Image.effect_noise((200, 200), 60).convert("RGB") for _ in range(2)]
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    img = Image.open(io.BytesIO(buf.getvalue()))
    img.seek(1)
    return buf.getvalue()[: img.tile[0].offset + 1000]


@pytest.fixture(scope="module")
def browser():
    from tests.browser import chromium_path

    try:
        import playwright  # noqa: F401
    except ImportError:
        playwright = None
    if chromium_path() is None or playwright is None:
        missing = "the chromium package" if chromium_path() is None else "playwright"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):  # CI runs them, never skips (.ci/run installs)
            pytest.fail(f"{missing} is missing: the report's browser tests cannot run")
        pytest.skip(f"{missing} is not installed (apt-get install chromium; pip install playwright)")
    from tests.browser import launch

    with launch() as b:
        yield b


@pytest.fixture(scope="module")
def extract_run(tmp_path_factory, tiny_checkpoint, sample_docs):
    """ocr+extract over demo documents, bad inputs and a file named with markup, with a schema whose validator
    no output passes; then one page's text and one JSON value replaced by hostile markup."""
    import pymupdf

    from docpipe.config import RunConfig
    from docpipe.execute.run import run
    from docpipe.render.text_layer import page_markdown

    folder = tmp_path_factory.mktemp("report-in")
    for name in ("report.pdf", "receipt.png"):
        shutil.copy(sample_docs / name, folder / name)
    shutil.copy(sample_docs / "scan.jpg", folder / HOSTILE_NAME)
    for name in BAD:
        (folder / name).write_bytes(CORPUS[name][0]())
    (folder / "cut.tiff").write_bytes(_second_frame_cut())
    out = tmp_path_factory.mktemp("report-out")
    config = RunConfig(inputs=[str(folder)], output=str(out), task="ocr+extract", executor="local",
                       model={"name": "tiny-random", "max_new_tokens": 6}, route={"text_layer": "never"},
                       extract={"schema": "tests.extraction_models:AuditedTotal", "max_new_tokens": 48},
                       checkpoint_s=0.001)  # a file per finished document: points for the pages/s curve
    manifest = run(config).manifest.model_dump()

    # What a model could write: the report must show it as text. Page 3 gets the blocks its text layer gives (this
    # run sent every page to the model, which gives none), for the boxes drawn over its image.
    pages, docs = [], []
    for rel in manifest["files"]["pages"]:
        rows = pq.read_table(out / rel).to_pylist()
        for p in rows:
            if p["source_uri"].endswith("report.pdf") and p["page_number"] == 1:
                p["text"] = HOSTILE_TEXT
            if p["source_uri"].endswith("report.pdf") and p["page_number"] == 3:
                p["blocks"] = page_markdown(pymupdf.open(folder / "report.pdf")[2]).blocks
        _rewrite(out / rel, rows)
        pages += rows
    for rel in manifest["files"]["documents"]:
        rows = pq.read_table(out / rel).to_pylist()
        for d in rows:
            if d["source_uri"].endswith("report.pdf"):
                assert any(e.startswith("total: ") for e in d["validation_errors"]), d["validation_errors"]
                d["extraction"] = json.dumps(json.loads(d["extraction"]) | {"note": HOSTILE_VALUE})
        _rewrite(out / rel, rows)
        docs += rows
    return out, manifest, pages, {d["source_uri"].rsplit("/", 1)[-1]: d for d in docs}


def _rewrite(path, rows):
    """Write the rows back, keeping the file's modification time (the report's pages/s curve reads it)."""
    stat = os.stat(path)
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture(scope="module")
def site(extract_run, tmp_path_factory):
    out, manifest, _, _ = extract_run
    folder = tmp_path_factory.mktemp("site")
    proc = run_cli("report", out, "--output", folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report     {folder}/index.html" in proc.stdout
    return folder


def _open(browser, path):
    from tests.browser import new_page

    page = new_page(browser)
    page.goto(path.as_uri())
    return page


def _count(page, key):
    return int(page.locator(f'[data-count="{key}"]').inner_text())


def test_overview_counts_are_the_manifests(browser, site, extract_run):
    _, manifest, _, docs = extract_run
    page = _open(browser, site / "index.html")
    for table in ("documents", "pages"):
        for status, n in manifest[table].items():
            assert _count(page, f"{table}.{status}") == n, (table, status)
    assert manifest["documents"] == {"ok": 4, "partial": 1, "error": 4, "total": 9}
    for error_type in ("empty_file", "encrypted_document", "unsupported_media_type", "corrupt_document"):
        assert _count(page, f"documents.error.{error_type}") == 1
    assert _count(page, "pages.error.image_decode_error") == manifest["pages"]["error"] == 1
    assert _count(page, "extraction.invalid") == sum(1 for d in docs.values() if d["valid"] is False) > 0
    # where each ok page's text came from: the model, or routing (multi.tiff's two frames are blank)
    assert _count(page, "text_source.model") == manifest["counters"]["pages_model"] == manifest["pages"]["ok"] - 2
    assert _count(page, "text_source.blank") == manifest["counters"]["pages_blank"] == 2
    # and why the model read them: this run sent every page to it (--text-layer never)
    assert _count(page, "route_reason.text_layer_never") == manifest["counters"]["pages_model"]
    # The plots are the site's own files and they load.
    for img in page.locator(".plots img").all():
        assert img.evaluate("el => el.complete && el.naturalWidth > 0"), img.get_attribute("src")
    # Status counts, output tokens, and pages/s from the times the run's pages files were sealed.
    assert page.locator(".plots img").evaluate_all("els => els.map(e => e.getAttribute('src'))") == [
        "plots/status.svg", "plots/tokens.svg", "plots/rate.svg"]

    # Filtering the list by status and by error type.
    page.select_option("#filter-status", "error")
    visible = page.locator("#document-list tbody tr:visible")
    assert visible.count() == manifest["documents"]["error"]
    assert set(visible.evaluate_all("rows => rows.map(r => r.dataset.status)")) == {"error"}
    page.select_option("#filter-status", "")
    page.select_option("#filter-error", "encrypted_document")
    assert visible.all_inner_texts()[0].startswith("encrypted.pdf") and visible.count() == 1
    page.select_option("#filter-error", "image_decode_error")
    assert visible.all_inner_texts()[0].startswith("cut.tiff") and visible.count() == 1
    assert page.errors == []


def test_document_view_shows_each_page_image_beside_its_text(browser, site, extract_run):
    _, _, pages, docs = extract_run
    page = _open(browser, site / "index.html")
    page.locator("#document-list a", has_text="report.pdf").click()
    page.wait_for_load_state("load")
    assert page.locator("h1.docname").inner_text() == "report.pdf"
    articles = page.locator("article.page")
    assert articles.count() == docs["report.pdf"]["page_count"] == 3
    uri = docs["report.pdf"]["source_uri"]
    for n in (1, 2, 3):
        article = page.locator(f"#page-{n}")
        img = article.locator("img")
        img.scroll_into_view_if_needed()
        img.element_handle().wait_for_element_state("visible")
        page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
        # Rendered afresh for the report, small: the longest side is 1000 px (A4: 707 x 1000).
        assert img.evaluate("el => [el.naturalWidth, el.naturalHeight]") == [707, 1000]
        assert "finish:" in article.locator(".pagemeta").inner_text()
    # The model's text, as recorded, beside page 2.
    recorded = next(p["text"] for p in pages if p["source_uri"] == uri and p["page_number"] == 2)
    assert recorded and page.locator("#page-2 .rawtext").text_content() == recorded
    assert page.locator("#page-2 .page-markdown").inner_text().strip() != ""
    assert page.errors == []


def test_layout_blocks_are_drawn_over_the_page_image_and_can_be_hidden(browser, site, extract_run):
    _, _, pages, _ = extract_run
    blocks = next(p["blocks"] for p in pages if p["source_uri"].endswith("report.pdf") and p["page_number"] == 3)
    assert len(blocks) >= 3 and {"heading", "table"} <= {b["kind"] for b in blocks}
    page = _open(browser, site / "index.html")
    page.locator("#document-list a", has_text="report.pdf").click()
    page.wait_for_load_state("load")
    img = page.locator("#page-3 img")
    img.scroll_into_view_if_needed()
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
    rects = page.locator("#page-3 svg.blocks rect")
    assert rects.count() == len(blocks)
    assert [rects.nth(i).get_attribute("data-kind") for i in range(len(blocks))] == [b["kind"] for b in blocks]
    frame = img.bounding_box()
    for i, b in enumerate(blocks):  # each box where the block is, as a fraction of the page image
        box = rects.nth(i).bounding_box()
        assert abs(box["x"] - (frame["x"] + b["x0"] * frame["width"])) <= 2, (b, box, frame)
        assert abs(box["y"] - (frame["y"] + b["y0"] * frame["height"])) <= 2, (b, box, frame)
        assert abs(box["width"] - (b["x1"] - b["x0"]) * frame["width"]) <= 3, (b, box, frame)
    assert page.locator("#page-2 svg.blocks").count() == 0  # a model page: no boxes
    page.locator("#show-blocks").uncheck()
    assert not page.locator("#page-3 svg.blocks").is_visible()
    page.locator("#show-blocks").check()
    assert page.locator("#page-3 svg.blocks").is_visible()
    assert page.errors == []


def test_validation_error_is_shown_at_its_field(browser, site, extract_run):
    page = _open(browser, site / "index.html")
    page.locator("#document-list a", has_text="report.pdf").click()
    page.wait_for_load_state("load")
    assert page.locator("#extraction .badge").inner_text() == "not valid"
    field = page.locator('#extraction .jnode[data-path="total"]')
    assert field.locator(".jkey").first.inner_text() == "total"
    error = field.locator(".validation-error")
    assert "total must be confirmed by a second source" in error.inner_text()


def test_markup_from_documents_stays_text(browser, site):
    page = _open(browser, site / "index.html")
    link = page.locator("#document-list a", has_text="onerror")
    assert link.inner_text() == HOSTILE_NAME
    assert page.locator('img[src="x"]').count() == 0
    link.click()
    page.wait_for_load_state("load")
    assert page.locator("h1.docname").inner_text() == HOSTILE_NAME
    page.goto(site.as_uri() + "/index.html")
    page.goto(_views(page)["report.pdf"])
    first = page.locator("#page-1 .page-markdown")
    assert "<script>window.pwned=2</script><b>not bold</b>" in first.inner_text()
    assert first.locator("script, b, i").count() == 0
    # The Markdown table is a table; the markup in its cell is text.
    assert first.locator("table td").first.inner_text() == "<i>North</i>"
    assert page.locator('#extraction .jnode[data-path="note"] .jvalue').inner_text() == json.dumps(HOSTILE_VALUE)
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.locator("script").count() == 0  # document views carry no script at all
    assert page.errors == []


def _views(page) -> dict[str, str]:
    """Document name -> its view's address, from the index's list."""
    links = page.locator("#document-list a").evaluate_all("as => as.map(a => [a.textContent, a.href])")
    return dict(links)


def test_every_page_shows_its_text_or_error(browser, site, extract_run):
    """All documents get a full view here (9 < the cap): each shows every recorded page, with its text or its
    error, and documents that could not be opened show why."""
    _, _, rows, docs = extract_run
    page = _open(browser, site / "index.html")
    views = _views(page)
    assert set(views) == set(docs)
    for name, doc in docs.items():
        page.goto(views[name])
        expected = sorted(r["page_number"] for r in rows if r["source_uri"] == doc["source_uri"])
        shown = page.locator("article.page").evaluate_all("els => els.map(e => Number(e.dataset.page))")
        assert shown == expected, name
        for article in page.locator("article.page").all():
            has_text = article.locator(".page-markdown").count() == 1
            has_error = article.locator(".page-error").count() == 1
            is_blank = article.locator(".page-blank").count() == 1  # routed away from the model: no text
            assert [has_text, has_error, is_blank].count(True) == 1, name
            assert is_blank == (name == "multi.tiff"), name
        if doc["status"] != "ok":
            assert page.locator("#doc-error").inner_text() == f"{doc['error_type']} {doc['error_message']}"
    # The failed page: its recorded error beside why the report has no image of it either.
    failed = next(r for r in rows if r["status"] == "error")
    page.goto(views["cut.tiff"])
    assert page.locator("#page-2 .page-error").inner_text() == f"image_decode_error {failed['error_message']}"
    assert page.locator("#page-2 .noimage").inner_text().startswith("no image: image_decode_error: OSError")
    assert page.locator("#page-1 img").evaluate("el => el.naturalWidth") == 200
    assert page.errors == []


def test_json_tree_places_errors_at_their_fields():
    tree, apart = json_tree({"a": {"b": 1}, "items": [{"x": None}]},
                            ["a.b: too small", "items.0.y: Field required", "<output>: not complete JSON (length)",
                             "chunk 2: timeout: slow", "<root>: bad"])
    a = tree["children"][0]
    assert a["children"][0]["errors"] == [{"where": "a.b", "message": "too small", "exact": True}]
    item = tree["children"][1]["children"][0]
    assert item["path"] == "items.0" and item["errors"] == [
        {"where": "items.0.y", "message": "Field required", "exact": False}]
    assert tree["errors"] == [{"where": "<root>", "message": "bad", "exact": True}]
    assert apart == [{"where": "<output>", "message": "not complete JSON (length)"},
                     {"where": "chunk 2", "message": "timeout: slow"}]


def test_full_views_put_errors_first_then_a_sample():
    docs = [{"source_uri": f"d{i:02d}", "status": "ok"} for i in range(20)] + [
        {"source_uri": f"s{i}", "status": "skipped"} for i in range(5)] + [
        {"source_uri": "e1", "status": "error"}, {"source_uri": "p1", "status": "partial"}]
    chosen, note = choose_full_views(docs, 5, "run-1")
    assert {"e1", "p1"} <= {d["source_uri"] for d in chosen} and len(chosen) == 5
    assert not [d for d in chosen if d["status"] == "skipped"]  # no pages in this run: last in line
    assert chosen == choose_full_views(docs, 5, "run-1")[0]  # the same run gives the same sample
    assert note == ("Full views for 5 of 27 documents (the cap is 5): 2 of 2 in error or partial, then a random "
                    "sample of 3 of the 25 others.")
    chosen, note = choose_full_views(docs, 24, "run-1")
    assert sum(d["status"] == "skipped" for d in chosen) == 2
    assert choose_full_views(docs, 27, "run-1")[1] == "Every document (27) has a full view."


def test_an_output_older_than_contract_v3_is_shown(extract_run, tmp_path):
    """Pages files from before text_source and renderer existed: the report reads them as not recorded."""
    from docpipe.tools.report import ReportOptions, write_report

    out, manifest, _, _ = extract_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for rel in manifest["files"]["pages"]:
        table = pq.read_table(old / rel)
        pq.write_table(table.drop_columns(["text_source", "renderer"]), old / rel)
    result = write_report(str(old), site_uri=str(tmp_path / "site"), options=ReportOptions(max_documents=1))
    assert result.pages == {"ok": manifest["pages"]["ok"], "error": 1} and result.full_views == 1
    index = (tmp_path / "site" / "index.html").read_text()
    assert (f'<td data-count="text_source.not recorded (output older than contract v3)">{manifest["pages"]["ok"]}'
            in index)
    assert "Full views for 1 of 9 documents (the cap is 1): 1 of 5 in error or partial" in index


def test_an_output_older_than_contract_v4_is_shown(extract_run, tmp_path):
    """Files from before route_reason existed (contract v3), so without any column contract 5 added either, and a
    record without contract 5's fields: the report reads route_reason as not recorded, and the rest as null."""
    from tests.test_lake import MANIFEST_SINCE_V3, SINCE_V3
    from docpipe.tools.report import ReportOptions, write_report

    out, manifest, _, _ = extract_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for table, columns in SINCE_V3.items():
        for rel in manifest["files"][table]:
            pq.write_table(pq.read_table(old / rel).drop_columns(columns), old / rel)
    record = old / "_runs" / f"{manifest['run_id']}.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                  if k not in MANIFEST_SINCE_V3} | {"contract_version": 3}))
    result = write_report(str(old), site_uri=str(tmp_path / "site"), options=ReportOptions(max_documents=1))
    assert result.pages == {"ok": manifest["pages"]["ok"], "error": 1}
    index = (tmp_path / "site" / "index.html").read_text()
    assert "· contract v3</p>" in index
    assert (f'<td data-count="route_reason.not recorded (output older than contract v4)">'
            f'{manifest["counters"]["pages_model"]}') in index
    assert f'<td data-count="text_source.model">{manifest["counters"]["pages_model"]}' in index


def test_report_errors_are_one_line(tmp_path, extract_run):
    proc = run_cli("report", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"docpipe: error: no finished run in {tmp_path}: no _runs/<run_id>.json " \
                                  "(is it a docpipe output?)"
    out, manifest, _, _ = extract_run
    proc = run_cli("report", out, "--run", "nope", "--output", tmp_path / "site")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"docpipe: error: no run nope in {out}; latest runs: {manifest['run_id']}"


def test_tables_that_disagree_with_the_manifest_show_the_warning(browser, extract_run, tmp_path):
    """A page row lost from the pages table after the run: the overview, in the browser, says the tables and the
    manifest disagree, and by how much."""
    out, manifest, _, _ = extract_run
    lost = tmp_path / "lost"
    shutil.copytree(out, lost)
    rel = next(r for r in manifest["files"]["pages"] if any(p["status"] == "ok" for p in pq.read_table(out / r)
                                                            .to_pylist()))
    rows = pq.read_table(lost / rel).to_pylist()
    drop = next(i for i, p in enumerate(rows) if p["status"] == "ok")
    _rewrite(lost / rel, rows[:drop] + rows[drop + 1:])
    proc = run_cli("report", lost, "--output", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = _open(browser, tmp_path / "site" / "index.html")
    warning = page.locator("#mismatch")
    assert warning.is_visible()
    text = warning.inner_text()
    assert text.startswith("The tables and the run manifest disagree:")
    recorded = {k: v for k, v in manifest["pages"].items() if k != "total"}
    assert f"pages: the manifest says {recorded}, the pages table has " in text
    counted = ast.literal_eval(text.split("the pages table has ", 1)[1].splitlines()[0])  # as the report prints it
    assert counted == recorded | {"ok": recorded["ok"] - 1}
    assert "documents:" not in text  # the documents table still agrees
    assert page.errors == []
    # the unchanged output shows no warning
    proc = run_cli("report", out, "--output", tmp_path / "agrees")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _open(browser, tmp_path / "agrees" / "index.html").locator("#mismatch").count() == 0


CSP_LISTENER = ("window.__violations = []; document.addEventListener('securitypolicyviolation', "
                "e => window.__violations.push([e.effectiveDirective, e.blockedURI]));")


@pytest.mark.parametrize("view", ["index", "document"])
def test_the_content_security_policy_blocks_an_inline_script_that_reached_the_page(browser, site, view, tmp_path):
    """Escaping keeps document markup text (test_markup_from_documents_stays_text); the policy is the second wall.
    An inline script and an inline handler put into a generated page as if escaping had failed do not run, and
    Chromium reports the violations; the site's own script still runs (the index's filters work)."""
    from tests.browser import new_page

    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    if view == "index":
        target = copy / "index.html"
    else:
        target = next(p for p in copy.rglob("*.html") if p.name != "index.html")
    html = target.read_text()
    assert 'http-equiv="Content-Security-Policy"' in html and "script-src 'self'" in html
    injected = '<script>window.pwned = "inline"</script><img src="missing.png" onerror="window.pwned = \'handler\'">'
    target.write_text(html.replace("</body>", injected + "</body>", 1))
    page = new_page(browser)
    page.add_init_script(CSP_LISTENER)  # Playwright's own init script: outside the page's policy
    page.goto(target.as_uri())
    page.wait_for_load_state("load")
    assert page.evaluate("typeof window.pwned") == "undefined"
    violations = page.evaluate("window.__violations")
    directives = {d for d, _ in violations}
    assert ["script-src-elem", "inline"] in violations, violations
    assert "script-src-attr" in directives or "script-src" in directives, violations  # the onerror handler
    assert any("Content Security Policy" in e for e in page.errors), page.errors
    if view == "index":  # report.js, the site's own file, ran: filtering hides rows
        rows = page.locator("#document-list tbody tr:visible")
        before = rows.count()
        page.select_option("#filter-status", "error")
        assert 0 < rows.count() < before


def test_max_page_images_caps_the_images_per_document(extract_run, tmp_path):
    """--max-page-images 1: report.pdf (3 pages) gets an image for its first page only; the others say why."""
    out, _, _, _ = extract_run
    proc = run_cli("report", out, "--output", tmp_path / "site", "--max-page-images", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    views = [p for p in (tmp_path / "site").rglob("*.html") if "report.pdf" in p.read_text() and p.name != "index.html"]
    [view] = [p for p in views if 'id="page-3"' in p.read_text()]
    html = view.read_text()
    assert "Images for the first 1 pages only (--max-page-images)." in html
    assert 'alt="page 1"' in html and 'alt="page 2"' not in html and 'alt="page 3"' not in html
    assert html.count("no image: not rendered for the report") == 2
    [folder] = {p.parent for p in (tmp_path / "site").rglob("*.jpg") if p.parent.name == view.stem}
    assert sorted(p.name for p in folder.glob("*.jpg")) == ["p00001.jpg"]
