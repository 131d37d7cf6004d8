"""The README stays short and the docs hold together: every relative link and image in README.md and
docs/*.md points at a file that exists (and, into a Markdown page, at a heading that exists), and the
README links every docs page."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README = REPO / "README.md"
README_MAX_LINES = 160
PAGES = ["getting-started.md", "configuration.md", "config-reference.md", "data.md", "training.md",
         "parallelism.md", "checkpoints.md", "clusters.md", "observability.md", "failures.md",
         "performance.md", "cli.md", "architecture.md"]

# [text](target) and ![alt](target); a target may carry a "title" after a space
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")


def outside_fences(text: str) -> list[str]:
    """The lines of ``text`` outside fenced code blocks (where ``#`` lines are not headings).

    Example:
        >>> outside_fences("# a\\n```\\n# b\\n```\\n## `c`")
        ['# a', '## `c`']
    """
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return kept


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans, where brackets are not links.

    Example:
        >>> prose("a [x](y.md)\\n```\\n[z](w.md)\\n```\\nb `[v](u.md)`")
        'a [x](y.md)\\nb '
    """
    return "\n".join(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line) for line in outside_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens.

    Example:
        >>> slug("Recipes: `recipe=`")
        'recipes-recipe'
        >>> slug("Plots without W&B")
        'plots-without-wb'
        >>> slug("The `data/` group (`DataConfig`)")
        'the-data-group-dataconfig'
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link's text
    text = re.sub(r"[^\w\- ]", "", text.replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in outside_fences(page.read_text()):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def markdown_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{page.relative_to(REPO)}: {target} (no heading #{anchor} in {path.name})")
    return broken


def test_every_relative_link_and_image_resolves():
    broken = [b for page in markdown_pages() for b in broken_links(page)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_links_are_found():
    assert "docs/getting-started.md" in links(README)
    assert any(t.startswith("plots/") for t in links(DOCS / "observability.md"))  # images count too


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md: {lines} lines, more than {README_MAX_LINES}"


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("\n## ", 1)[0]
    assert "make demo" in head and "make test" in head


def test_every_docs_page_exists_and_the_readme_links_it():
    missing = [p for p in PAGES if not (DOCS / p).is_file()]
    assert not missing, f"docs pages missing: {missing}"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    unlinked = [p for p in PAGES if (DOCS / p).resolve() not in linked]
    assert not unlinked, f"README.md does not link: {unlinked}"


def test_docstring_examples():
    import doctest

    runner = doctest.DocTestRunner()
    for fn in (outside_fences, prose, slug):
        for example in doctest.DocTestFinder().find(fn, globs={fn.__name__: fn}):
            runner.run(example)
    assert runner.summarize(verbose=False).failed == 0
