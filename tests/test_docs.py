"""The documentation holds together: every relative link and anchor resolves, the front page stays
a front page, the configuration page lists every Config key with its default, and the
architecture page's layout names every module.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from common.config import Config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A front page, not a lab notebook (issue 24): about the size of a Flower baseline's README.
FRONT_PAGE_BYTES = 12 * 1024

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
ROW = re.compile(r"^\| `(\w+\.\w+)` \| `([^`]*)` \|", re.M)


def prose(text: str) -> str:
    """Markdown without fenced blocks and code spans: what a renderer turns into links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a page; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    repeats: Counter[str] = Counter()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        found.add(f"{base}-{repeats[base]}" if repeats[base] else base)
        repeats[base] += 1
    return found


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: fix these links:\n" + "\n".join(broken)


def test_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n## A title\n\n[ok](#a-title) [gone](#no-such) [file](missing.md) `[code](x.md)`\n")
    assert relative_links(page) == ["#a-title", "#no-such", "missing.md"]
    assert anchors(page) == {"a-title", "a-title-1"}


def test_slug_matches_github() -> None:
    assert slug("The powered study (issue 12)") == "the-powered-study-issue-12"
    assert slug("One command: `fedpagkd`") == "one-command-fedpagkd"
    assert slug("`flwr run .`") == "flwr-run-"


def test_readme_is_a_front_page() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size <= FRONT_PAGE_BYTES, f"README.md is {size:,} bytes: move detail to a docs/ page and link it"


def documented_defaults() -> dict[str, object]:
    """docs/configuration.md's key table: {key: default as TOML reads it}."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = ROW.findall(text)
    keys = [key for key, _ in rows]
    assert len(keys) == len(set(keys)), "docs/configuration.md lists a key twice"
    return {key: tomllib.loads(f"v = {value}")["v"] for key, value in rows}


def config_defaults() -> dict[str, object]:
    cfg = Config()
    return {
        f"{section.name}.{field.name}": getattr(getattr(cfg, section.name), field.name)
        for section in dataclasses.fields(cfg)
        for field in dataclasses.fields(getattr(cfg, section.name))
    }


def test_configuration_page_lists_every_key_with_its_default() -> None:
    documented, actual = documented_defaults(), config_defaults()
    assert set(documented) == set(actual), (
        f"docs/configuration.md: add {sorted(set(actual) - set(documented))}, remove {sorted(set(documented) - set(actual))}"
    )
    wrong = {key: (documented[key], value) for key, value in actual.items() if documented[key] != value}
    assert not wrong, f"docs/configuration.md defaults (documented, Config): {wrong}"


def layout_block(directory: str) -> str:
    """The lines of docs/architecture.md's layout that describe ``directory`` (its line and the
    indented lines under it)."""
    lines = (ROOT / "docs" / "architecture.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{directory}/"))
    rest = lines[start + 1 :]
    end = next((i for i, line in enumerate(rest) if not line.startswith(" ")), len(rest))
    return "\n".join(lines[start : start + 1 + end])


@pytest.mark.parametrize("package", ["server", "client", "common", "benchmarks"])
def test_architecture_layout_names_every_module(package: str) -> None:
    block = layout_block(package)
    modules = [p for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py"]
    missing = [str(p.relative_to(ROOT)) for p in modules if p.name not in block]
    assert not missing, f"docs/architecture.md, layout of {package}/: add a line for {missing}"
