"""``docpipe eval``: error rates computed by hand, labels in every format, field accuracy, and the label-free
score against the text layer."""

from __future__ import annotations

import csv
import json
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docpipe.config import RouteOptions, RunConfig
from docpipe.tools.evaluate import OutputRows, edits, field_matches, normalise_value, score_labels
from tests.conftest import run_cli

MODEL = {"name": "tiny-random", "max_new_tokens": 4, "do_image_splitting": False}


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory, tiny_checkpoint):
    """An output whose page text is known: a 2-page PDF answered by its text layer."""
    import pymupdf

    from docpipe.execute.run import run

    folder = tmp_path_factory.mktemp("eval")
    doc = pymupdf.open()
    for text in ("the cat sat on the mat", "hello world"):
        doc.new_page(width=200, height=100).insert_text((10, 50), text, fontsize=11)
    (folder / "in").mkdir()
    doc.save(folder / "in" / "two.pdf")
    result = run(RunConfig(inputs=[str(folder / "in")], output=str(folder / "out"), executor="local", model=MODEL,
                           route=RouteOptions(text_layer="auto", min_chars=5)))
    assert result.manifest.counters["pages_text_layer"] == 2
    return folder


def _labels(folder: Path) -> list[dict]:
    [page] = pq.read_table(folder / "out" / "pages", columns=["doc_id", "source_uri"]).to_pylist()[:1]
    uri, doc_id = page["source_uri"], page["doc_id"]
    return [
        # "the cat sat on a mat" (20 chars, 6 words) vs "the cat sat on the mat": a->t, +h, +e: 3 edits; 1 word.
        {"source_uri": uri, "page_number": 1, "text": "the cat sat on a mat"},
        # "Hello world" (11 chars after whitespace normalisation) vs "hello world": 1 edit; 1 of 2 words.
        {"doc_id": doc_id, "page_number": 2, "text": "Hello \n world "},
        # No such page in the output: scored as empty text, 6 of 6 characters and 2 of 2 words deleted.
        {"source_uri": uri, "page_number": 3, "text": "abc de"},
    ]


def _write(labels: list[dict], path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in labels))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["source_uri", "doc_id", "page_number", "text"])
            w.writeheader()
            w.writerows(labels)
    else:
        pq.write_table(pa.Table.from_pylist([{"source_uri": None, "doc_id": None} | r for r in labels]), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_error_rates_computed_by_hand(routed_run, tmp_path, fmt):
    labels = _write(_labels(routed_run), tmp_path / f"labels.{fmt}")
    out, report, scores = routed_run / "out", tmp_path / "eval.json", tmp_path / "scores.parquet"
    proc = run_cli("eval", out, "--labels", labels, "--json", report, "--scores", scores)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(report.read_text())
    assert summary["cer"] == pytest.approx(10 / 37)  # (3 + 1 + 6) / (20 + 11 + 6)
    assert summary["wer"] == pytest.approx(4 / 10)  # (1 + 1 + 2) / (6 + 2 + 2)
    assert (summary["pages_scored"], summary["pages_missing"]) == (3, 1)
    assert summary["field_accuracy"] is None and summary["documents_scored"] == 0
    assert "CER        27.03 %" in proc.stdout and "WER        40.00 %" in proc.stdout
    rows = sorted(pq.read_table(scores).to_pylist(), key=lambda r: r["page_number"])
    assert [(r["char_edits"], r["ref_chars"], r["word_edits"], r["ref_words"]) for r in rows] == [
        (3, 20, 1, 6), (1, 11, 1, 2), (6, 6, 2, 2)]
    assert [r["cer"] for r in rows] == pytest.approx([3 / 20, 1 / 11, 1.0])
    assert [r["text_source"] for r in rows] == ["text_layer", "text_layer", None]


def test_default_scores_file_lands_under_out(routed_run, tmp_path):
    from docpipe.tools.evaluate import evaluate

    labels = _write(_labels(routed_run), tmp_path / "labels.jsonl")
    summary = evaluate(str(routed_run / "out"), labels=str(labels))
    path = Path(summary["scores_file"])
    assert path.parent == routed_run / "out" / "_eval" and pq.read_table(path).num_rows == 3


def test_bad_labels_are_one_line_errors(routed_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"page_number": 1, "text": "x"}) + "\n")
    proc = run_cli("eval", routed_run / "out", "--labels", bad)
    assert proc.returncode == 2 and "row 1: needs source_uri or doc_id" in proc.stderr
    proc = run_cli("eval", routed_run / "out")
    assert proc.returncode == 2 and "--labels" in proc.stderr


def test_edit_distance_basics():
    assert edits("kitten", "sitting") == {"ref_chars": 6, "char_edits": 3, "ref_words": 1, "word_edits": 1,
                                                "cer": 0.5, "wer": 1.0}
    assert edits("", "noise")["cer"] is None and edits("", "noise")["char_edits"] == 5
    assert edits("a  b\tc", "a b c")["char_edits"] == 0  # whitespace normalised


def test_field_normalisation():
    assert normalise_value("1,234.50") == normalise_value(1234.5) == Decimal("1234.5")
    assert normalise_value("$12") == normalise_value(12)
    assert normalise_value("March 5, 2024") == normalise_value("2024-03-05") == normalise_value("05.03.2024")
    assert normalise_value("5 March 2024") == "2024-03-05"
    assert normalise_value("03/05/2024") == "03/05/2024"  # ambiguous: stays a string
    assert normalise_value("  ACME   Corp ") == normalise_value("acme corp")
    assert normalise_value(None) is None and normalise_value(True) is True


def test_field_accuracy_by_hand():
    """Two documents, 8 labelled fields, 6 matches: 6/8; per field too."""
    doc1 = {"invoice_number": "INV-1", "total": 1234.5, "date": "2024-03-05",
            "items": [{"description": "Widget", "price": 10}]}
    doc2 = {"invoice_number": "INV-2", "total": 99, "date": None}
    rows = OutputRows(pages={}, documents={
        "a.pdf": {"source_uri": "a.pdf", "doc_id": "A", "status": "ok", "extraction": json.dumps(
            {"invoice_number": "inv-1", "total": "1,234.50", "date": "March 5, 2024",
             "items": [{"description": "Gadget", "price": "10.00"}], "extra": "not scored"})},
        "B": {"source_uri": "b.pdf", "doc_id": "B", "status": "ok", "extraction": json.dumps(
            {"invoice_number": "INV-3", "total": 99.0})},
    })
    labels = [{"source_uri": "a.pdf", "extraction": doc1}, {"doc_id": "B", "extraction": doc2}]
    summary, pages = score_labels(rows, labels)
    assert pages == [] and summary["documents_scored"] == 2 and summary["fields_scored"] == 8
    # doc1: invoice_number (case), total, date, items[0].price match; items[0].description does not (4/5)
    # doc2: total matches, date null == missing matches, invoice_number does not (2/3)
    assert summary["field_accuracy"] == pytest.approx(6 / 8)
    assert summary["fields"] == {"date": 1.0, "invoice_number": 0.5, "items[].description": 0.0,
                                 "items[].price": 1.0, "total": 1.0}
    assert field_matches({"a": 1}, None) == {"a": False}


def test_against_text_layer_counts_model_pages_only(sample_docs, tiny_checkpoint, tmp_path):
    """A run with --text-layer auto whose rules are stricter than the defaults (min_chars 200): report.pdf's
    sparser pages 2 and 3 go to the model, and only they are scored against their text layer; routed pages,
    and the scan (no text layer), are not counted. The reference is the layer's Markdown without its markup."""
    from docpipe.tools.demo import LOREM
    from docpipe.tools.evaluate import normalise_text
    from docpipe.execute.run import run

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("report.pdf", "minutes.pdf", "scan.jpg"):
        (inputs / name).write_bytes((sample_docs / name).read_bytes())
    result = run(RunConfig(inputs=[str(inputs)], output=str(tmp_path / "out"), executor="local", model=MODEL,
                           route=RouteOptions(text_layer="auto", min_chars=200)))
    assert (result.manifest.counters["pages_text_layer"], result.manifest.counters["pages_model"]) == (3, 3)
    report, scores = tmp_path / "eval.json", tmp_path / "scores.parquet"
    proc = run_cli("eval", tmp_path / "out", "--against", "text-layer", "--json", report, "--scores", scores)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(report.read_text())
    assert summary["pages_scored"] == 2
    assert summary["pages_not_scored"] == {"not_from_model": 3, "no_trusted_text_layer": 1, "unreadable_source": 0,
                                           "unreadable_text_layer": 0}
    rows = sorted(pq.read_table(scores).to_pylist(), key=lambda r: r["page_number"])
    assert [(Path(r["source_uri"]).name, r["page_number"], r["text_source"]) for r in rows] == [
        ("report.pdf", 2, "model"), ("report.pdf", 3, "model")]
    refs = [normalise_text("Regional notes " + LOREM.replace("Quarterly", "Regional")),  # '# ' of the heading gone
            "Appendix Definitions and sources. Region Q1 Q2 Q3 North 120 135 150 South 98 101 117"]  # a table's too
    assert [r["ref_chars"] for r in rows] == [len(r) for r in refs]
    assert summary["cer"] == pytest.approx(sum(r["char_edits"] for r in rows) / sum(len(r) for r in refs))
    assert summary["cer"] > 0.5  # the tiny random model reads nothing


def test_against_text_layer_scores_pages_pdfium_drew(tiny_checkpoint, tmp_path, monkeypatch):
    """A PDF MuPDF asks a password for (only its attachment is encrypted) is drawn by PDFium; eval reads its text
    layer with PDFium too, instead of ending with MuPDF's 'document closed or encrypted'."""
    from docpipe.execute.run import run
    from tests import test_wild_pdfs

    text = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
    monkeypatch.setattr(test_wild_pdfs, "CONTENT", f"BT /F1 12 Tf 72 600 Td ({text}) Tj ET".encode())
    data = test_wild_pdfs.encrypted_pdf("/Identity", "/Identity")
    assert test_wild_pdfs.mupdf_verdict(data) == "needs a password"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "locked.pdf").write_bytes(data)
    result = run(RunConfig(inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), executor="local", model=MODEL,
                           route=RouteOptions(text_layer="never")))  # the model reads it: eval scores model pages
    assert result.manifest.counters["pages_rendered_pdfium"] == 1
    report = tmp_path / "eval.json"
    proc = run_cli("eval", tmp_path / "out", "--against", "text-layer", "--json", report)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(report.read_text())
    assert summary["pages_scored"] == 1 and summary["pages_not_scored"] == {
        "not_from_model": 0, "no_trusted_text_layer": 0, "unreadable_source": 0, "unreadable_text_layer": 0}
    [row] = pq.read_table(next((tmp_path / "out" / "_eval").glob("*.parquet"))).to_pylist()
    assert row["ref_chars"] == len(text)


def test_the_latest_row_of_each_page_counts_by_run_id_whatever_the_file_order(routed_run, tmp_path):
    """Two later files beside the run's own: one from an earlier run (its name sorts last) with wrong text for both
    pages, one from a later run (its name sorts first) with page 1's text as labelled and page 2 failed. The later
    run's rows count: page 1 scores no edit, page 2 is missing (its latest row is an error), the older text nowhere."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(routed_run / "out", out)
    [sealed] = sorted((out / "pages").rglob("part-*.parquet"))
    schema = pq.read_schema(sealed)
    rows = sorted(pq.read_table(sealed).to_pylist(), key=lambda r: r["page_number"])
    assert [r["text"] for r in rows] == ["the cat sat on the mat", "hello world"]
    older = [r | {"run_id": "19990101T000000Z-000000", "text": "a text an older run wrote"} for r in rows]
    newer = [rows[0] | {"run_id": "29990101T000000Z-ffffff", "text": "the cat sat on a mat"},
             rows[1] | {"run_id": "29990101T000000Z-ffffff", "status": "error", "text": None,
                        "error_type": "model_error", "error_message": "failed in the later run"}]
    pq.write_table(pa.Table.from_pylist(older, schema=schema), sealed.parent / "part-zzzzzz-older.parquet")
    pq.write_table(pa.Table.from_pylist(newer, schema=schema), sealed.parent / "part-000000-newer.parquet")
    uri = rows[0]["source_uri"]
    labels = _write([{"source_uri": uri, "page_number": 1, "text": "the cat sat on a mat"},
                     {"source_uri": uri, "page_number": 2, "text": "hello world"}], tmp_path / "labels.jsonl")
    report, scores = tmp_path / "eval.json", tmp_path / "scores.parquet"
    proc = run_cli("eval", out, "--labels", labels, "--json", report, "--scores", scores)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(report.read_text())
    assert (summary["pages_scored"], summary["pages_missing"]) == (2, 1)
    assert summary["cer"] == pytest.approx(11 / 31)  # page 1: 0 of 20; page 2: all 11 characters, as empty text
    by_page = {r["page_number"]: r for r in pq.read_table(scores).to_pylist()}
    assert (by_page[1]["char_edits"], by_page[1]["status"]) == (0, "ok")
    assert (by_page[2]["char_edits"], by_page[2]["status"], by_page[2]["missing"]) == (11, "error", True)
