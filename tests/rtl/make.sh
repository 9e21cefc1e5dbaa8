#!/usr/bin/env bash
# Prints each page here to PDF with a real browser (Debian's chromium; fonts-dejavu-core for the Arabic and Hebrew
# glyphs): the fixtures of tests/test_scripts.py, committed so the tests need neither the browser nor the fonts.
set -euo pipefail
cd "$(dirname "$0")"
for name in ar he he_unruled; do
    chromium --headless --no-sandbox --disable-gpu --no-pdf-header-footer --print-to-pdf="$name.pdf" "$name.html"
done
