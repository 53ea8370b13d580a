"""Headless Chromium (Debian's package) driven by Playwright, for the checks a person would make by eye.

Playwright's own browser download does not work here: it drives /usr/bin/chromium (installed by
infra/system_deps.sh). Screenshots go to docs/img/ (shown in the README) when SEGPIPE_SCREENSHOTS=1,
else to the test's tmp dir, so a plain `make test` leaves the work tree clean.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in a container
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


@contextmanager
def browser_page(viewport: tuple[int, int] = (1400, 1000)) -> Iterator[Any]:
    """A fresh page of a fresh headless Chromium (closed afterwards)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            yield context.new_page()
        finally:
            browser.close()


def screenshot_path(name: str, tmp_path: Path) -> Path:
    """docs/img/<name> when SEGPIPE_SCREENSHOTS=1 (refreshing the README's pictures), else tmp."""
    folder = ROOT / "docs" / "img" if os.environ.get("SEGPIPE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
