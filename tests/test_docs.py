"""The README and docs/: every link they make leads somewhere, and the set-up holds its two commands."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page: Path) -> set[str]:
    return {anchor(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_names_a_file_or_heading(page: Path):
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, fragment = target.partition("#")
        linked = page.parent / path if path else page
        if not linked.exists() or fragment and fragment not in headings(linked):
            broken.append(target)
    assert not broken, f"{page.name} links to what is not there: {broken}"


def test_readme_set_up_is_one_main_and_one_test_command():
    text = (ROOT / "README.md").read_text()
    for block in ("main", "test"):
        found = re.findall(rf"<!-- {block} -->\n```bash\n(.+)\n```\n<!-- /{block} -->", text)
        assert len(found) == 1 and "pip install" in found[0], block
    assert "kvpred generate" in re.search(r"<!-- main -->\n```bash\n(.+)\n", text).group(1)
    assert "pytest" in re.search(r"<!-- test -->\n```bash\n(.+)\n", text).group(1)
