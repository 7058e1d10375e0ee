"""Open a self-contained page in headless Chromium (Debian's package, driven by playwright):
its console errors, its visible text, and a screenshot saved as a test artifact."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).parent / "artifacts"  # screenshots of the pages the tests opened


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (`make system-packages` installs it)")
    return path


def render(page_path: Path, screenshot_name: str) -> tuple[list[str], str]:
    """(console errors and page errors, the page's visible text); blocks every network request
    that is not the page itself, so a page that needs an external script or font shows it."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    errors, external = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def only_local(route):
                url = route.request.url
                if url.startswith(("file://", "data:")):
                    route.continue_()
                else:
                    external.append(url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(Path(page_path).resolve().as_uri(), wait_until="load")
            text = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / screenshot_name), full_page=True)
        finally:
            browser.close()
    return errors + [f"external request: {u}" for u in external], text
