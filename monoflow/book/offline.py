"""The offline check of the built book: scripts, stylesheets, images and frames that a page
would load over the network."""
from __future__ import annotations

import html.parser
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["external_resources"]


class _ResourceParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: List[str] = []

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        values = dict(attrs)
        url = None
        if tag in {"script", "img", "iframe"}:
            url = values.get("src")
        elif tag == "link" and (values.get("rel") or "") in {"stylesheet", "preload", "modulepreload"}:
            url = values.get("href")
        if url and url.strip().lower().startswith(("http://", "https://", "//")):
            self.found.append(f"<{tag}> {url}")


def external_resources(html_dir: Path) -> Dict[str, List[str]]:
    """Scripts, stylesheets, images and frames that built pages load over the network.

    Returns a mapping page -> list of offending tags; empty when the book works offline.
    Links (``<a href>``) are not resources and are allowed.
    """
    html_dir = Path(html_dir)
    if not html_dir.is_dir():
        raise FileNotFoundError(f"built HTML folder {html_dir} not found")
    problems: Dict[str, List[str]] = {}
    for page in sorted(html_dir.rglob("*.html")):
        parser = _ResourceParser()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        if parser.found:
            problems[str(page.relative_to(html_dir))] = parser.found
    return problems
