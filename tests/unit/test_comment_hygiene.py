"""Comments and docstrings say what the code does and why, not what one run measured or when.

Measured figures, dates and references to a tracker's tickets go to docs/ and benchmarks/README.md,
where they can be dated and linked to their result files; a comment that quotes them goes stale
silently. This reads every comment (tokenize) and every docstring or bare string statement (ast) in
client/, daemon/, tests/ and benchmarks/ and fails on a date, a rate figure or a ticket reference.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TREES = ("client", "daemon", "tests", "benchmarks")
SKIP_PARTS = {"_proto", "__pycache__", ".venv", "results"}

FORBIDDEN = re.compile(
    r"\b20\d\d-[01]\d-[0-3]\d\b"  # a date
    r"|\d\s*GB/s\b"  # a measured rate ("Rates are GB/s" names the unit and is fine)
    r"|\bissues?\s*#?\d+"  # a ticket by its number
    r"|\b(?:the|this|that)\s+issue(?:'s)?\b(?!\s+(?:of|and)\b)"  # a ticket by a pronoun
    r"|\bissue-level\b|\bacceptance\s+\d"  # a ticket's acceptance criteria
    r"|(?<![\w&])#\d{3,}\b",  # a pull request or ticket by a hash and its number
    re.IGNORECASE,
)

# (path relative to the repository, a substring of the flagged line): deliberate exceptions. Keep short.
ALLOWED: set[tuple[str, str]] = set()


def texts(source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and every string that stands as a statement of its own: module,
    class and function docstrings, and the strings that document an attribute."""
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for i, line in enumerate(node.value.value.splitlines()):
                yield node.lineno + i, line


def findings(source: str, rel: str) -> list[str]:
    out = []
    for line, text in texts(source):
        if FORBIDDEN.search(text) and not any(rel == p and s in text for p, s in ALLOWED):
            out.append(f"{rel}:{line}: {text.strip()}")
    return out


def sources() -> Iterator[Path]:
    for tree in TREES:
        for path in sorted((REPO / tree).rglob("*.py")):
            if not SKIP_PARTS.intersection(path.relative_to(REPO).parts):
                yield path


def test_the_scan_flags_what_it_is_for():
    bad = '"""Seen on 2026-12-02."""\n# 45.5 GB/s on one GPU\nx = 1  # issue 3 asks for this\n# see #1234\n'
    bad += 'def f():\n    """The issue\'s bound is 100 ms."""\n'
    assert len(findings(bad, "x.py")) == 5, findings(bad, "x.py")
    fine = '"""Rates are GB/s (1e9 bytes)."""\n# whoever issues tickets; the next issue sweeps them\n'
    fine += 's = "2026-12-02 in code is data, not a comment"\n'
    assert findings(fine, "x.py") == []


def test_no_dates_figures_or_ticket_references_in_comments_and_docstrings():
    found = [f for path in sources() for f in findings(path.read_text(), str(path.relative_to(REPO)))]
    assert found == [], "move these to docs/ or benchmarks/README.md:\n" + "\n".join(found)
