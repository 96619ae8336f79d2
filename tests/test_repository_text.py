"""What the repository says of itself: no words about how it was made, and no dead links.

Code, docs, tests and bench speak of the product; the history of its making belongs elsewhere.
Every relative link in README.md and docs/ points at a file that exists and, with a #fragment,
at a heading that exists.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

from privbench.report import blocks

ROOT = Path(__file__).resolve().parents[1]
PROCESS_WORDS = re.compile(r"\bsessions?\b|\bwaves?\b|\bissues?\b|\bthe team\b", re.IGNORECASE)
# Legitimate uses: pytest's fixture scope, and the trackers of public repositories.
ALLOWED = [re.compile(p) for p in (r'scope="session"', r"github\.com/[\w.-]+/[\w.-]+/issues", r"GitHub issues")]
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".sh", ".yml", ".yaml", ""}


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an sdist): every file under the root
        return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [ROOT / line for line in out.stdout.splitlines()]


def test_no_process_words():
    found = []
    for path in _tracked():
        if path.suffix not in TEXT_SUFFIXES or "fixtures" in path.parts or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if path.name == Path(__file__).name and ("PROCESS_WORDS" in line or "ALLOWED = " in line):
                continue
            cleaned = line
            for allowed in ALLOWED:
                cleaned = allowed.sub("", cleaned)
            if PROCESS_WORDS.search(cleaned):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _headings(path: Path) -> set[str]:
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", path.read_text(), re.MULTILINE)}


DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)  # code blocks hold no links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in _headings(path):
            broken.append(f"{target}: no heading #{fragment}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_generated_tables_match_their_committed_rows(capsys):
    """README and docs tables are regenerated from committed rows (`privbench report`): a stale
    block, or one whose rows are gone, fails here."""
    files = [p for p in DOCS if blocks.blocks(p.read_text())]
    assert ROOT / "README.md" in files
    code, out, err = run_cli(["report", "--check", *map(str, files)], capsys)
    assert code == 0, err + out
