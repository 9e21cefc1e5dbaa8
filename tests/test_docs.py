"""The docs stay true to the code and to themselves: the generated reference pages are current, every relative
link leads somewhere, and the README stays a front page."""

import re
from pathlib import Path

from docpipe.tools import reference
from tests.conftest import REPO

README_MAX_LINES = 250
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)")


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a `[x](y)` is not a link."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(lines)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    fenced = False
    for line in path.read_text().splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_the_reference_pages_are_what_the_generator_writes_now():
    for path, text in reference.pages().items():
        assert path.exists() and path.read_text() == text, (
            f"{path.relative_to(REPO)} is stale: regenerate it with `make docs` "
            f"(or `.venv/bin/python -m docpipe.tools.reference`) and commit the result")


def test_the_generator_is_deterministic():
    assert reference.pages() == reference.pages()


def test_every_relative_link_leads_to_a_file_and_heading():
    broken = []
    for page in _pages():
        for match in _LINK.finditer(_without_code(page.read_text())):
            target = match.group(1) or match.group(2)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(REPO)}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where} (no such heading in {dest.relative_to(REPO)})")
    assert broken == []


def test_the_links_check_sees_links():
    # Guards the check above against a regex that matches nothing.
    links = _LINK.findall(_without_code((REPO / "README.md").read_text()))
    assert len(links) >= 10
    assert _slug("Nothing lost: resume and the `lease`") == "nothing-lost-resume-and-the-lease"


def test_the_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
