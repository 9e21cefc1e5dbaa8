"""Headless Chromium for the report tests (and the docs/report.png screenshot), driven by Playwright.

The browser is Debian's ``chromium`` package (.ci/run installs it); Playwright's own browser
download is never used. ``python -m tests.browser PAGE.html OUT.png`` takes a screenshot.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    """The browser: DOCPIPE_CHROMIUM when set (None if no such file), else chromium on the PATH."""
    if os.environ.get("DOCPIPE_CHROMIUM"):
        return os.environ["DOCPIPE_CHROMIUM"] if os.path.isfile(os.environ["DOCPIPE_CHROMIUM"]) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def launch():
    """Headless Chromium, closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, width: int = 1280, height: int = 900):
    """A page whose console errors and uncaught exceptions (a blocked script, say) land in ``page.errors``."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    return page


def screenshot(url: str, path: str, width: int = 1280, height: int = 900) -> None:
    with launch() as browser:
        page = new_page(browser, width, height)
        page.goto(url)
        page.screenshot(path=path)


if __name__ == "__main__":
    target = sys.argv[1]
    screenshot(target if "://" in target else "file://" + os.path.abspath(target), sys.argv[2])
