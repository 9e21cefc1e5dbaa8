"""What a user of marker, docling or olmOCR reaches for first (issue 31): `docpipe convert` (Markdown on stdout, no
output folder, no Ray), Markdown files beside the Parquet (`run --markdown`, `docpipe export`), the Python API
(`docpipe.run`, `docpipe.convert`, `docpipe.Converter`), PDF passwords, page ranges and `run --dry-run`.

Most of it runs in this process on one Converter (the tiny model loaded once); `docpipe convert` itself runs twice
through the CLI server. The Ray Dataset processor has its own file, tests/test_processor.py.
"""

from __future__ import annotations

import json
import sys

import pymupdf
import pytest
from PIL import Image, ImageDraw

from tests.conftest import run_cli

PASSWORD = "open-sesame-42"  # the run's password
OTHER = "second-key-77"  # other.pdf's, from the mapping file
TEXTS = [f"Quarterly report page {n}: revenue grew in every region, and the board approved the plan." for n in (1, 2, 3)]


def _pdf(path, texts, password=None):
    doc = pymupdf.open()
    for text in texts:
        doc.new_page().insert_text((72, 72), text)
    options = {"encryption": pymupdf.PDF_ENCRYPT_AES_256, "user_pw": password, "owner_pw": "owner-pw"} if password else {}
    doc.save(path, **options)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """report.pdf (3 text-layer pages), scan.png (a drawing: the model reads it), locked.pdf (the run's password),
    other.pdf (its own, from passwords.yaml), wrong.pdf (a password nobody gave) and notes.txt."""
    folder = tmp_path_factory.mktemp("first-touch")
    _pdf(folder / "report.pdf", TEXTS)
    image = Image.new("RGB", (480, 320), "white")
    ImageDraw.Draw(image).rectangle((40, 40, 440, 280), outline="black", width=6)
    image.save(folder / "scan.png")
    _pdf(folder / "locked.pdf", ["Locked memo: the vault code changes every Monday at nine o'clock sharp."], PASSWORD)
    _pdf(folder / "other.pdf", ["Other memo: salaries are reviewed in March, and bonuses are paid in April."], OTHER)
    _pdf(folder / "wrong.pdf", ["Nobody can read this one, since its password was never handed to docpipe."],
         "nobody-knows-it")
    (folder / "notes.txt").write_text("not a document")
    (folder / "passwords.yaml").write_text(f"'oth*.pdf': {OTHER}\n")
    return folder


@pytest.fixture(scope="module")
def converter(docs):
    import docpipe

    return docpipe.Converter({"model": {"name": "tiny-random", "max_new_tokens": 3},
                              "passwords": str(docs / "passwords.yaml")}, password=PASSWORD)


def test_convert_a_pdf_and_an_image_to_markdown_on_stdout(docs, tmp_path):
    """Markdown on stdout, each page opened by its marker, exit 0, and nothing written anywhere."""
    proc = run_cli("convert", docs / "report.pdf", docs / "scan.png", "--model", "tiny-random", "--max-new-tokens",
                   "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("docpipe:")]
    report, scan = proc.stdout.split(f"<!-- document {docs / 'report.pdf'} -->\n")[1].split(
        f"<!-- document {docs / 'scan.png'} -->\n")
    assert report.strip() == "\n\n".join(f"<!-- page {n} -->\n\n{text}" for n, text in enumerate(TEXTS, 1))
    scan_page = scan.strip().split("\n", 2)
    assert scan_page[0] == "<!-- page 1 -->" and scan_page[2].strip()  # the (random) model's text
    assert sorted(p.name for p in docs.iterdir()) == ["locked.pdf", "notes.txt", "other.pdf", "passwords.yaml",
                                                      "report.pdf", "scan.png", "wrong.pdf"]


def test_convert_failures_are_a_line_each_and_exit_1(docs, capsys, tmp_path, monkeypatch):
    """A document that fails has one stderr line and exit 1; the others still come out (JSON here, --pages 2).
    In this process: the command's code, with the model this worker has already imported."""
    from docpipe.cli import main

    code = main(["convert", str(docs / "locked.pdf"), str(docs / "report.pdf"), "--json", "--pages", "2",
                 "--model", "tiny-random"])
    proc = capsys.readouterr()
    assert code == 1, proc.err[-3000:]
    ours = [ln for ln in proc.err.splitlines() if ln.startswith("docpipe:")]
    assert ours == [f"docpipe: {docs / 'locked.pdf'}: error encrypted_document: PDF is encrypted and needs a "
                    "password (MuPDF: needs a password; PDFium: PdfiumError: Failed to load document (PDFium: "
                    "Incorrect password error).): give one with --password or --passwords"]
    locked, report = [json.loads(line) for line in proc.out.splitlines()]
    assert (locked["status"], locked["error_type"]) == ("error", "encrypted_document")
    assert (report["status"], report["page_count"]) == ("ok", 3)
    assert report["markdown"] == f"<!-- page 2 -->\n\n{TEXTS[1]}\n"

    md = tmp_path / "md"  # files instead of stdout: their paths are printed
    assert main(["convert", str(docs / "report.pdf"), "--pages", "3", "--markdown", str(md), "--model",
                 "tiny-random"]) == 0
    assert capsys.readouterr().out == f"{md / 'report.pdf.md'}\n"
    assert (md / "report.pdf.md").read_text() == f"<!-- page 3 -->\n\n{TEXTS[2]}\n"

    import io  # one document from stdin: `cat locked.pdf | docpipe convert - --password ...`

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((docs / "locked.pdf").read_bytes())))
    assert main(["convert", "-", "--json", "--model", "tiny-random", "--password", PASSWORD]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["source_uri"], row["status"]) == ("stdin", "ok") and row["markdown"].startswith(
        "<!-- page 1 -->\n\nLocked memo:")

    # a fatal error (an input that is not there, an option out of range) is one line and exit 2, as for `run`,
    # before any document is converted: nothing on stdout, not even the documents that are there
    for args, line in ((["convert", str(docs / "report.pdf"), str(tmp_path / "nosuch.pdf")],
                        f"docpipe: error: input not found: {tmp_path / 'nosuch.pdf'}"),
                       (["convert", str(docs / "report.pdf"), "--pages", "0"],
                        "docpipe: error: invalid option pages: Value error, page selection '0': '0' must count from "
                        "1, first page first")):
        assert main([*args, "--model", "tiny-random"]) == 2
        proc = capsys.readouterr()
        assert (proc.out, proc.err.splitlines()) == ("", [line])


def test_converter_opens_pdfs_with_the_run_password_or_their_own(converter, docs):
    """The run's password, a mapping file's glob, bytes in memory; a wrong one is an encrypted_document row that
    says which passwords were tried (never the passwords); no Ray started."""
    locked = converter.convert((docs / "locked.pdf").read_bytes(), name="memo.pdf")
    assert (locked.source_uri, locked.ok) == ("memo.pdf", True)
    assert locked.markdown == "<!-- page 1 -->\n\nLocked memo: the vault code changes every Monday at nine o'clock " \
                              "sharp.\n"
    other = converter.convert(docs / "other.pdf")
    assert other.ok and other.pages[0]["text"].startswith("Other memo: salaries") and other.pages[0]["text_source"] \
        == "text_layer"
    wrong = converter.convert(docs / "wrong.pdf")
    assert (wrong.status, wrong.document["error_type"], wrong.pages) == ("error", "encrypted_document", [])
    assert wrong.problem.startswith("error encrypted_document: PDF is encrypted and the password given does not open "
                                    "it (MuPDF: none of the passwords tried opens it (the run's password); ")
    assert wrong.markdown.startswith("<!-- document: error encrypted_document: PDF is encrypted and the password")
    rows = json.dumps([locked.document, other.document, wrong.document, locked.pages], default=str)
    assert PASSWORD not in rows and OTHER not in rows
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_run_from_python_writes_markdown_files_for_a_page_range(docs, tmp_path, capsys):
    """docpipe.run(dict) with --pages 2- and --markdown: pages outside the range are neither rendered nor written,
    page_count stays the document's own; one Markdown file per document, named below the inputs' folder; the
    password never reaches the manifest; export writes the same files from the output."""
    import docpipe

    out, md = tmp_path / "out", tmp_path / "md"
    config = {"inputs": [str(docs)], "output": str(out), "include": ["*.pdf"], "exclude": ["wrong.pdf"],
              "executor": "local", "progress": False, "model": {"name": "tiny-random", "max_new_tokens": 2},
              "pages": "2-", "password": PASSWORD, "markdown": str(md)}
    result = docpipe.run(config)
    m = result.manifest
    # locked.pdf and other.pdf have one page, none in 2-: empty_document (other.pdf has no password here either)
    assert m.documents == {"ok": 1, "error": 2, "total": 3} and m.counters["markdown_files"] == 3
    docs_rows = {r["source_uri"].rsplit("/", 1)[-1]: r for r in result.documents().to_pylist()}
    assert (docs_rows["report.pdf"]["status"], docs_rows["report.pdf"]["page_count"]) == ("ok", 3)
    assert docs_rows["locked.pdf"]["error_message"] == "none of its 1 pages is in --pages 2-"
    assert docs_rows["other.pdf"]["error_type"] == "encrypted_document"
    pages = sorted((p["page_number"], p["page_count"], p["text"]) for p in result.pages().to_pylist())
    assert pages == [(2, 3, TEXTS[1]), (3, 3, TEXTS[2])]
    files = {p.relative_to(md).as_posix(): p.read_text() for p in md.rglob("*.md")}
    assert sorted(files) == ["locked.pdf.md", "other.pdf.md", "report.pdf.md"]
    assert files["report.pdf.md"] == f"<!-- page 2 -->\n\n{TEXTS[1]}\n\n<!-- page 3 -->\n\n{TEXTS[2]}\n"
    assert files["locked.pdf.md"] == ("<!-- document: error empty_document: none of its 1 pages is in --pages 2- "
                                      "-->\n")
    manifest = (out / "_runs" / f"{m.run_id}.json").read_text()
    assert PASSWORD not in manifest and json.loads(manifest)["config"]["password"] == "**********"

    from docpipe.cli import main

    assert main(["export", str(out), "--markdown", str(tmp_path / "again")]) == 0
    assert capsys.readouterr().out == f"markdown   3 files in {tmp_path / 'again'} (documents: error 2, ok 1)\n"
    assert {p.relative_to(tmp_path / "again").as_posix(): p.read_text()
            for p in (tmp_path / "again").rglob("*.md")} == files

    # a dry run of the same job skips what is done, and what failed for good under the same pages (locked.pdf has
    # none in 2-), but not an encrypted PDF, since the job has passwords; with another page range, it would do them
    # again, and says why
    plan = docpipe.dry_run(config)
    assert [(a, u.rsplit("/", 1)[-1]) for a, u, _ in plan.entries] == [
        ("skip", "locked.pdf"), ("process", "other.pdf"), ("skip", "report.pdf"), ("filtered", "notes.txt"),
        ("filtered", "passwords.yaml"), ("filtered", "scan.png"), ("filtered", "wrong.pdf")]
    reasons = {u.rsplit("/", 1)[-1]: (a, why) for a, u, why in plan.entries}
    assert reasons["report.pdf"] == ("skip", f"unchanged since run {m.run_id}, where it was ok")
    assert reasons["locked.pdf"] == ("skip", f"unchanged since run {m.run_id}, where it failed for good "
                                             "(empty_document): --retry-failed reads it")
    assert reasons["other.pdf"] == ("process", f"error in run {m.run_id} (encrypted_document): tried again")
    assert reasons["wrong.pdf"] == ("filtered", "matches --exclude 'wrong.pdf'")
    assert reasons["scan.png"] == ("filtered", "matches no --include ('*.pdf')")
    other_range = docpipe.dry_run({**config, "pages": "1"})
    assert ("process", str(docs / "report.pdf"), f"done in run {m.run_id} under another --pages") in \
        other_range.entries
    assert ("process", str(docs / "locked.pdf"), f"error in run {m.run_id} (empty_document): tried again") in \
        other_range.entries


class FolderWatch:
    """What happens to the files of a folder, as the kernel tells it (inotify(7)): each file opened, read, written,
    created, deleted or touched, whichever library or process did it. Listing the folder (stat, readdir) is not
    reported for its files."""

    EVENTS = {0x1: "read", 0x2: "written", 0x4: "touched", 0x20: "opened", 0x100: "created", 0x200: "deleted"}

    def __init__(self, folder):
        import ctypes
        import os

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert self._libc.inotify_add_watch(self.fd, os.fsencode(folder), sum(self.EVENTS)) >= 0, \
            os.strerror(ctypes.get_errno())

    def events(self) -> set[tuple[str, str]]:
        """(file name, what happened) since the last call."""
        import os
        import struct

        data = b""
        while True:
            try:
                data += os.read(self.fd, 65536)
            except BlockingIOError:  # nothing more queued
                break
        seen, at = set(), 0
        while at < len(data):
            _, mask, _, size = struct.unpack_from("iIII", data, at)
            name = data[at + 16:at + 16 + size].rstrip(b"\0").decode()
            at += 16 + size
            if name:  # an empty name: the folder itself (opened to list it)
                seen |= {(name, what) for bit, what in self.EVENTS.items() if mask & bit}
        return seen

    def close(self) -> None:
        import os

        os.close(self.fd)


def test_dry_run_reads_nothing_and_writes_nothing(docs, tmp_path, capsys):
    from docpipe.cli import main

    out = tmp_path / "never"
    watch = FolderWatch(docs)
    try:
        assert main(["run", str(docs), "--output", str(out), "--dry-run", "--exclude", "*.txt", "--exclude",
                     "*.yaml"]) == 0
        assert watch.events() == set()  # the listing's stat of each file, and not a byte more
        (docs / "report.pdf").read_bytes()[:1]  # the watch sees what a run would do
        assert watch.events() == {("report.pdf", "opened"), ("report.pdf", "read")}
    finally:
        watch.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"process   {docs / 'locked.pdf'}  (new)", f"process   {docs / 'other.pdf'}  (new)"]
    assert lines[-1] == f"dry run    5 to process, 0 to skip, 2 filtered out; output {out} (nothing read or written)"
    assert f"filtered  {docs / 'notes.txt'}  (matches --exclude '*.txt')" in lines
    assert not out.exists()  # no folders, no lease


def test_markdown_marks_failures_and_names_files_safely():
    from docpipe.output.markdown import MarkdownNames, document_markdown

    doc = {"source_uri": "/d/a.pdf", "status": "partial"}
    pages = [{"page_number": 2, "status": "error", "error_type": "render_error", "error_message": "bad\n--> x"},
             {"page_number": 1, "status": "ok", "text": "One."}, {"page_number": 3, "status": "ok", "text": ""}]
    assert document_markdown(doc, pages) == (
        "<!-- page 1 -->\n\nOne.\n\n<!-- page 2: error render_error: bad - -> x -->\n\n<!-- page 3 -->\n")
    names = MarkdownNames(["s3", "bucket"])
    assert names.name("s3://bucket/in/a.pdf") == "in/a.pdf.md"
    assert names.name("s3://bucket/../x/./b:c.pdf") == "_/x/_/b_c.pdf.md"  # no way out of DIR
    assert names.name("s3://bucket/in/A.pdf") == "in/A.pdf-" + __import__("hashlib").sha256(
        b"s3://bucket/in/A.pdf").hexdigest()[:8] + ".md"  # a.pdf's name, case apart: a name of its own
    assert names.name("s3://bucket/in/a.pdf") == "in/a.pdf.md"  # the same document, the same name
    long = names.name("s3://bucket/" + "é" * 300 + ".pdf")
    assert len(long.encode()) <= 204 and long.endswith(".md")

    from docpipe.api import Converted  # an extraction that is not valid is not ok: convert's exit 1

    invalid = Converted({"source_uri": "x.pdf", "status": "ok", "schema_name": "invoice", "valid": False,
                         "validation_errors": ["total: Field required"]})
    assert not invalid.ok and invalid.problem == "extraction not valid for schema invoice: total: Field required"


def test_page_ranges_passwords_and_the_package_api_are_checked_early(tmp_path, monkeypatch):
    import docpipe
    from docpipe.config import RunConfig, parse_pages
    from docpipe.errors import ConfigError
    from docpipe.execute.submit import job_entrypoint

    assert parse_pages("1-5, 8,10-") == ((1, 5), (8, 8), (10, None))
    for bad in ("0", "5-2", "a", "1-2-3", ""):
        with pytest.raises(ValueError):
            RunConfig(output="o", pages=bad)
    with pytest.raises(ConfigError, match="password is not sent with a job"):
        job_entrypoint(RunConfig(output="o", password="s3cret-pw"))
    (tmp_path / "bad.yaml").write_text("- just a list\n")
    with pytest.raises(ConfigError, match="must map paths or globs to passwords"):
        docpipe.dry_run({"inputs": [str(tmp_path)], "output": str(tmp_path / "o"),
                         "passwords": str(tmp_path / "bad.yaml")})
    from docpipe.render.passwords import load_passwords
    from docpipe.storage import redact

    (tmp_path / "secret").write_text("from-the-file-1\nignored\n")  # a mounted secret: its first line
    monkeypatch.setenv("DOCPIPE_PDF_PASSWORD", "from-the-env-22")
    assert load_passwords(RunConfig(output="o", password_file=str(tmp_path / "secret"))).candidates("/a.pdf") == [
        ("the run's password", "from-the-file-1")]
    assert load_passwords(RunConfig(output="o")).candidates("/a.pdf") == [("the run's password", "from-the-env-22")]
    assert redact("tried from-the-file-1 and from-the-env-22") == "tried *** and ***"
    assert {"run", "convert", "Converter", "build_processor", "RunResult"} <= set(dir(docpipe))
    with pytest.raises(AttributeError):
        docpipe.no_such_thing
