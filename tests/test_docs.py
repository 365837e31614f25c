"""The README's figures come from the docs it links to, and every relative link resolves."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])

# A measured figure: a decimal (0.1908, 2.84) or a number with thousands separators (26,004);
# versions (2.1.0), code spans, fenced blocks and link targets are not figures.
FIGURE = re.compile(r"(?<![\w.,])\d+(?:,\d{3})*\.\d+(?!\d|\.\d)|(?<![\w.,])\d{1,3}(?:,\d{3})+(?!\d|[.,]\d)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE = re.compile(r"`[^`]*`")


def prose(text):
    """The text without fenced blocks, code spans and link targets."""
    return LINK.sub("", CODE.sub("", FENCE.sub("", text)))


def slug(heading):
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path):
    """The anchors a markdown file's headings give."""
    text = FENCE.sub("", path.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.*)$", text, re.M)}


def readme_units():
    """The README as (heading, chunk) pairs: each table row apart, the rest of a section whole."""
    units = []
    for section in re.split(r"^(?=## )", (ROOT / "README.md").read_text(), flags=re.M):
        heading = section.splitlines()[0] if section else ""
        rows = [line for line in section.splitlines() if line.startswith("|")]
        rest = "\n".join(line for line in section.splitlines() if not line.startswith("|"))
        units += [(heading, row, section) for row in rows] + [(heading, rest, section)]
    return units


def linked_docs(text, base):
    """The local markdown files a chunk of text links to."""
    out = []
    for target in LINK.findall(text):
        path = target.split("#")[0]
        if path.endswith(".md") and "://" not in path:
            out.append((base / path).resolve())
    return out


def test_figures_in_the_readme_appear_in_the_doc_they_link_to():
    """Each figure of a README table row (or section) is in a doc that row (or section) links to."""
    missing = []
    for heading, chunk, section in readme_units():
        figures = FIGURE.findall(prose(chunk))
        if not figures:
            continue
        docs = linked_docs(chunk, ROOT) or linked_docs(section, ROOT)
        assert docs, f"{heading}: figures {figures} without a link to the doc they come from"
        texts = " ".join(d.read_text() for d in docs)
        missing += [(heading, f, [d.name for d in docs]) for f in figures if f not in texts]
    assert not missing, missing


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    """Every relative link of README, CHANGELOG and docs/ names a file that exists, and its anchor."""
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, broken


def test_the_readme_is_a_tour():
    """The README opens with the two commands and stays short."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    assert [line.split()[:2] for line in block.splitlines()] == [["make", "run"], ["make", "test"]]
    assert text.index("```sh") < text.index("\n## ")
    assert len(text.splitlines()) <= 210


def test_the_figure_pattern():
    """Decimals and thousands count as figures; versions, code and link targets do not."""
    assert FIGURE.findall(prose("p99 2.84 s in 26,004 requests")) == ["2.84", "26,004"]
    assert FIGURE.findall(prose("DGL 2.1.0, `0.5`, [x](a.md#v1.2), Recall@20, 1.24x")) == ["1.24"]
