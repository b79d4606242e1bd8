"""The README and docs/: every relative link and image they show points at a file that exists, and
every anchor at a heading of that file."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    text = page.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert page.name != "README.md" or len(links) >= 8
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_file(), f"{page.name}: {link}"
        if fragment:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), flags=re.M)
            assert fragment in {anchor(h) for h in headings}, f"{page.name}: {link}"
