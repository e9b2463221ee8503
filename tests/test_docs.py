"""The README and the pages under docs/: every relative link reaches a file, every anchor a heading
of its page (GitHub's rule), the README stays a front door (at most 250 lines), and no page carries
issue numbers or dated diary entries. Pure Python: nothing of jaxllm is imported."""

import re
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
# [text](target) and ![alt](target), the target without spaces, an optional "title" after it
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
ISSUE = re.compile(r"issue\s*#?\d+", re.I)
HASH_NUMBER = re.compile(r"(?<![\w&/#])#\d+\b")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def prose(text: str) -> str:
    """``text`` without fenced code blocks (their lines kept empty, so line numbers hold)."""
    lines, fenced = [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fenced is None and m:
            fenced = m.group(1)
            lines.append("")
        elif fenced is not None:
            if line.strip().startswith(fenced):
                fenced = None
            lines.append("")
        else:
            lines.append(line)
    return "\n".join(lines)


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase; inline markup and punctuation dropped (letters,
    digits, underscores, hyphens and spaces kept); each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset:
    """Every anchor of ``page``'s headings; a repeated heading gets GitHub's -1, -2 ... suffix."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text(encoding="utf-8")).split("\n"):
        m = HEADING.match(line)
        if not m:
            continue
        base = github_anchor(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(page: Path) -> list[tuple[int, str]]:
    """``(line number, target)`` of every Markdown link and image outside code."""
    text = prose(page.read_text(encoding="utf-8"))
    text = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]


def broken_links(page: Path) -> list[str]:
    """One line per relative link of ``page`` whose file does not exist or whose anchor names no
    heading of its target page; http(s) and mailto links are not checked."""
    problems = []
    for line, target in links(page):
        if re.match(r"(https?|mailto|ftp):", target, re.I):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{line}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no file {path}")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def mentions(page: Path, pattern: re.Pattern) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return [f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
            for m in pattern.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    assert not broken_links(page), "\n".join(broken_links(page))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers_or_dates(page):
    found = mentions(page, ISSUE) + mentions(page, HASH_NUMBER) + mentions(page, DATE)
    assert not found, "issue numbers or dates belong in the tracker and git history:\n" + "\n".join(found)


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}: move detail to docs/)"


def test_docs_index_links_every_page():
    index = ROOT / "docs" / "README.md"
    linked = {(index.parent / target.partition("#")[0]).resolve() for _, target in links(index)}
    missing = [p.name for p in PAGES if p.parent == index.parent and p != index and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link {missing}"


def test_the_checker_catches_what_it_should(tmp_path, monkeypatch):
    """A missing file and a missing anchor are reported; a good link, an http link, a link inside
    code and GitHub's anchor of a heading with markup and punctuation are not."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Title\n\n## What a run records, and what `--resume` verifies\n## Dup\n## Dup\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Here\n[ok](other.md#what-a-run-records-and-what---resume-verifies) [dup](other.md#dup-1)\n"
        "[self](#here) [web](https://example.com/x#y) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[gone](missing.md) [bad](other.md#nope) [bad self](#there)\n")
    assert len(broken_links(page)) == 3, broken_links(page)
    assert github_anchor("Corpora larger than memory: `jaxllm prepare` and `--tokens`") == \
        "corpora-larger-than-memory-jaxllm-prepare-and---tokens"
