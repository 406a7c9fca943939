"""The built book in a real browser: every page loads in headless Chromium with all of its figures,
MathJax (vendored, no network) typesets the mathematics and no raw LaTeX is left in the text.

Needs Chromium (Debian/Ubuntu: ``apt-get install -y chromium``); skipped with that reason when it
is missing. Reuses the book that ``test_book.py`` builds in the same session.
"""
from __future__ import annotations

import html as html_module
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import pytest

test_book = pytest.importorskip("test_book", reason="the book tests need the book extras: pip install -e '.[book]'")

CHROMIUM: Optional[str] = next(
    (path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")) if path),
    None,
)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)"),
]

# (page, needs mathematics, minimum number of figures)
PAGES = [
    ("intro", True, 0),
    ("chapters/01_theory", True, 6),
    ("chapters/02_expressivity_1d", True, 2),
    ("chapters/03_toy_densities_2d", True, 2),
    ("chapters/04_images", True, 0),
    ("reproduce", False, 0),
    ("references", False, 0),
]

# Appended to a copy of each page: once the page and MathJax are done, report what the browser
# sees. Code blocks are left out of the raw-LaTeX search (matplotlib labels in code are TeX).
_PROBE = r"""
<script>
window.addEventListener("load", function () {
  function report() {
    var images = Array.prototype.slice.call(document.querySelectorAll("article img"));
    var article = (document.querySelector("article") || document.body).cloneNode(true);
    article.querySelectorAll("pre, code, script, style, mjx-container, .MathJax").forEach(function (n) { n.remove(); });
    var text = article.textContent;
    var raw = text.match(/\\(frac|sqrt|mathrm|leftarrow|sum|langle|mathcal|tfrac|begin)\b|\$\$|\\\(|\\\[/g) || [];
    var out = document.createElement("pre");
    out.id = "monoflow-browser-report";
    out.textContent = JSON.stringify({
      images: images.length,
      broken: images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.getAttribute("src"); }),
      math: document.querySelectorAll("mjx-container").length,
      mathErrors: document.querySelectorAll("mjx-merror, [data-mjx-error]").length,
      mathjaxLoaded: typeof MathJax !== "undefined" && !!MathJax.startup && !!MathJax.startup.document,
      rawTex: raw.slice(0, 10),
    });
    document.body.appendChild(out);
  }
  if (typeof MathJax !== "undefined" && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(report, report);
  } else {
    report();
  }
});
</script>
"""

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
          "--virtual-time-budget=15000"]


def _browser_report(html: Path, page: str) -> Dict[str, object]:
    original = html / f"{page}.html"
    probe = original.with_name(f".probe-{original.name}")  # same folder: relative links still resolve
    probe.write_text(original.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    try:
        completed = subprocess.run([CHROMIUM, *_FLAGS, "--dump-dom", probe.as_uri()],
                                   capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    match = re.search(r'<pre id="monoflow-browser-report"[^>]*>(.*?)</pre>', completed.stdout, flags=re.S)
    assert match, f"{page}: the page did not finish loading in Chromium:\n{completed.stderr[-2000:]}"
    return json.loads(html_module.unescape(match.group(1)))


@pytest.fixture(scope="module")
def html() -> Path:
    return Path(test_book.quick_book()["html"])


@pytest.mark.parametrize("page, needs_math, figures", PAGES, ids=[page for page, _, _ in PAGES])
def test_page_renders_figures_and_math_in_chromium(html, page, needs_math, figures):
    report = _browser_report(html, page)
    assert report["images"] >= figures, f"{page}: {report['images']} figures, expected at least {figures}"
    assert not report["broken"], f"{page}: figures that did not load: {report['broken']}"
    if needs_math:  # Sphinx loads MathJax only on pages with mathematics
        assert report["mathjaxLoaded"], f"{page}: the vendored MathJax did not start"
        assert report["math"] > 0, f"{page}: no typeset mathematics"
    assert report["mathErrors"] == 0, f"{page}: MathJax reported {report['mathErrors']} errors"
    assert not report["rawTex"], f"{page}: raw LaTeX left in the text: {report['rawTex']}"


def test_screenshots_of_index_and_chapters_are_not_blank(html, tmp_path):
    from PIL import Image

    shots: List[Path] = []
    for page in ["index"] + [page for page, _, _ in PAGES]:
        target = tmp_path / f"{page.replace('/', '_')}.png"
        subprocess.run([CHROMIUM, *_FLAGS, f"--screenshot={target}", "--window-size=1280,2000",
                        (html / f"{page}.html").as_uri()], capture_output=True, timeout=120)
        assert target.is_file(), f"no screenshot of {page}"
        with Image.open(target) as image:
            grey = image.convert("L")
            darkest, _ = grey.getextrema()
            assert darkest < 100, f"{page}: the screenshot is blank"
        shots.append(target)
    assert len(shots) == len(PAGES) + 1
