"""The user-facing text holds together: README.md stays short, and every relative link in it and in docs/
leads to a file that exists and, with an anchor, to a heading of that file (GitHub's heading slugs)."""

import re
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces as -."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    out, in_code = set(), False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(_slug(line.lstrip("#")))
    return out


def test_the_slug_is_githubs() -> None:
    assert _slug(" Which scores find bad pairs: measured on real text") == "which-scores-find-bad-pairs-measured-on-real-text"
    assert _slug("The `base_*` columns, and more") == "the-base_-columns-and-more"


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(md: Path) -> None:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)  # links inside code are code
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


def test_the_readme_reads_in_ten_minutes() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def test_the_guide_counts_the_blog_sweeps_pruned_corpora() -> None:
    """The guide says how many pruned corpora an export of the blog sweep copies: prune's own list says."""
    from mtprune.config import load_config
    from mtprune.stages.prune import runs

    said = re.search(r"the blog sweep has (\d+)\)", (ROOT / "docs" / "guide.md").read_text(encoding="utf-8"))
    assert said is not None
    assert int(said.group(1)) == len(runs(load_config(ROOT / "configs" / "blog.yaml", []))) == 16
