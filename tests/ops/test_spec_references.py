"""The repository describes itself: section references resolve into docs/spec.md.

Code, tests and documents cite the specification as ``docs/spec.md §n``
(or a bare section sign and number next to such a citation). These tests
read every text file of the checkout (no imports of the package, no torch:
they take well under a second) and check that

* each such reference names a heading of docs/spec.md, and each numbered
  heading there has an anchor (``<a id="s5a">``) so it can be linked to;
* nothing cites the external documents the repository used to depend on;
* relative links in the Markdown documents point to files that exist.
"""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "docs" / "spec.md"
THIS_FILE = Path(__file__).resolve()

TEXT_SUFFIXES = {".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".toml", ".txt", ".sh", ".cfg", ".ini", ".yml", ".yaml"}
TEXT_NAMES = {"Makefile", "run"}
# Hidden folders are skipped (.git, .venv, caches) except these, which hold tracked sources.
HIDDEN_KEPT = {".ci", ".github"}
SKIPPED_DIRS = {"build", "dist", "__pycache__", "node_modules"}

SECTION_SIGN = "\u00a7"
# A section sign followed by anything that is not a section number is reported too.
REFERENCE = re.compile(SECTION_SIGN + r"\s*([0-9]+[a-z]*)?")
HEADING = re.compile(r"^#{1,6}\s+" + SECTION_SIGN + r"([0-9]+[a-z]*)\b", re.MULTILINE)
ANCHOR = re.compile(r'<a id="s([0-9]+[a-z]*)"></a>\s*\n#{1,6}\s+' + SECTION_SIGN + r"([0-9]+[a-z]*)\b")
# The sections code has cited since the project began; renumbering them would break those citations.
STABLE_SECTIONS = ("1", "2", "3", "4", "5", "5a", "5b", "5c", "6", "7", "8")
EXTERNAL_DOCS = re.compile(r"\b(?:SPEC|DESIGN)\.md\b|shared/docs")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _text_files():
    """``(relative path, text)`` of every text file, pruning hidden and build folders before walking them."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(
            d
            for d in dirs
            if not ((d.startswith(".") and d not in HIDDEN_KEPT) or d in SKIPPED_DIRS or d.endswith(".egg-info"))
        )
        for name in sorted(files):
            path = Path(folder) / name
            if (path.suffix not in TEXT_SUFFIXES and name not in TEXT_NAMES) or path.resolve() == THIS_FILE:
                continue
            try:
                yield path.relative_to(ROOT), path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


def _spec_sections():
    return HEADING.findall(SPEC.read_text(encoding="utf-8"))


def test_spec_has_the_stable_sections_once_each_with_an_anchor():
    sections = _spec_sections()
    assert len(sections) == len(set(sections)), f"duplicate section headings in docs/spec.md: {sections}"
    missing = [s for s in STABLE_SECTIONS if s not in sections]
    assert not missing, f"docs/spec.md lost the sections {missing} that code cites"
    anchored = {a for a, h in ANCHOR.findall(SPEC.read_text(encoding="utf-8")) if a == h}
    unanchored = [s for s in sections if s not in anchored]
    assert not unanchored, f'headings without an <a id="s<n>"></a> line right above them: {unanchored}'


def test_every_section_reference_resolves_to_a_spec_heading():
    sections = set(_spec_sections())
    bad = []
    for rel, text in _text_files():
        for match in REFERENCE.finditer(text):
            number = match.group(1)
            if number is None or number not in sections:
                line = text.count("\n", 0, match.start()) + 1
                bad.append(f"{rel}:{line}: {text.splitlines()[line - 1].strip()[:100]}")
    assert not bad, f"section references that are not headings of docs/spec.md ({sorted(sections)}):\n" + "\n".join(bad)


def test_no_reference_to_documents_outside_the_repository():
    bad = []
    for rel, text in _text_files():
        for match in EXTERNAL_DOCS.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            bad.append(f"{rel}:{line}: {match.group(0)}")
    assert not bad, "cite docs/spec.md and docs/design.md instead of external documents:\n" + "\n".join(bad)


def test_relative_markdown_links_resolve():
    bad = []
    for rel, text in _text_files():
        if rel.suffix != ".md":
            continue
        for match in MARKDOWN_LINK.finditer(text):
            target = match.group(1).split("#", 1)[0]
            if not target or re.match(r"^[a-z]+:", target):  # in-page anchor, http:, mailto:, ...
                continue
            if not (ROOT / rel.parent / target).exists():
                bad.append(f"{rel}: {match.group(1)}")
    assert not bad, "Markdown links to missing files:\n" + "\n".join(bad)
