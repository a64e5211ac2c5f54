"""Source hygiene: the comments and strings of comms/, topology/ and native/ (.py, .c, .h)
describe the code as it is. One test per file; a failure names file:line and the text.

Anywhere in a file (comments, docstrings, strings shown to users, code):
  - a date (YYYY-MM-DD): when a constant was measured belongs in docs/MEASUREMENTS.md;
  - a commit id ("commit 9dd3a1f") or "found by review": history belongs in `git log`;
  - a reference to a document that is not in the repository: DESIGN.md, BASELINES.md,
    docs/DESIGN, ../shared, /work/shared.
In comments and docstrings:
  - a repository path (comms/..., native/..., topology/..., docs/..., bench/..., tests/...)
    that does not exist (a glob such as comms/kernels/reference*.py must match something).
"""
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TREES = ("comms", "topology", "native")
SUFFIXES = (".py", ".c", ".h")

ANYWHERE = [
    (re.compile(r"(?<!\d)\d{4}-\d{2}-\d{2}(?!\d)"), "a date"),
    (re.compile(r"\bcommit\s+[0-9a-f]{6,40}\b", re.I), "a commit id"),
    (re.compile(r"found by review", re.I), "history ('found by review')"),
    (re.compile(r"DESIGN\.md|BASELINES\.md|docs/DESIGN|\.\./shared\b|/work/shared\b"),
     "a document that is not in the repository"),
]
PATH = re.compile(r"(?<![\w./-])((?:comms|native|topology|docs|bench|tests)/[\w.*/-]*)")


def _files():
    out = []
    for tree in TREES:
        for p in sorted((ROOT / tree).rglob("*")):
            if p.suffix in SUFFIXES and p.is_file() and "__pycache__" not in p.parts:
                out.append(p.relative_to(ROOT).as_posix())
    return out


def _py_regions(text):
    """(start (row, col), end (row, col)) of every comment and docstring (a string that is a
    statement of its own), rows from 1."""
    toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type != tokenize.NL]
    regions = [(t.start, t.end) for t in toks if t.type == tokenize.COMMENT]
    code = [t for t in toks if t.type != tokenize.COMMENT]
    opens = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    closes = {tokenize.NEWLINE, tokenize.ENDMARKER}
    for i, t in enumerate(code):
        if t.type != tokenize.STRING:
            continue
        before = code[i - 1] if i else None
        after = code[i + 1] if i + 1 < len(code) else None
        if ((before is None or before.type in opens or before.string == ";")
                and (after is None or after.type in closes or after.string == ";")):
            regions.append((t.start, t.end))
    return regions


def _c_regions(text):
    """(start, end) of every /* */ and // comment, skipping string and character literals."""
    regions, i, n, row, col = [], 0, len(text), 1, 0

    def advance(k):
        nonlocal i, row, col
        for ch in text[i:i + k]:
            row, col = (row + 1, 0) if ch == "\n" else (row, col + 1)
        i += k

    while i < n:
        two = text[i:i + 2]
        if two in ("/*", "//"):
            start = (row, col)
            end_at = text.find("*/", i + 2) + 2 if two == "/*" else text.find("\n", i)
            if end_at < 2 or end_at == -1:
                end_at = n
            advance(end_at - i)
            regions.append((start, (row, col)))
        elif text[i] in "\"'":
            quote, k = text[i], i + 1
            while k < n and text[k] != quote and text[k] != "\n":
                k += 2 if text[k] == "\\" else 1
            advance(k + 1 - i)
        else:
            advance(1)
    return regions


def _region_lines(lines, regions):
    """(line number, text) of each line piece inside a region."""
    for (srow, scol), (erow, ecol) in regions:
        for row in range(srow, erow + 1):
            line = lines[row - 1] if row - 1 < len(lines) else ""
            lo = scol if row == srow else 0
            hi = ecol if row == erow else len(line)
            yield row, line[lo:hi]


def _path_exists(ref, root):
    ref = ref.rstrip(".,:;")
    if "*" in ref:
        return any(root.glob(ref))
    return (root / ref).exists()


def problems(rel, root=ROOT):
    """What is wrong with file `rel` (relative to root): one 'file:line: what' each."""
    text = (root / rel).read_text(encoding="utf-8")
    lines = text.splitlines()
    out = []
    for no, line in enumerate(lines, 1):
        for rx, what in ANYWHERE:
            for m in rx.finditer(line):
                out.append(f"{rel}:{no}: {what}: {m.group(0)!r} in {line.strip()!r}")
    regions = _py_regions(text) if rel.endswith(".py") else _c_regions(text)
    for no, piece in _region_lines(lines, regions):
        for m in PATH.finditer(piece):
            if not _path_exists(m.group(1), root):
                out.append(f"{rel}:{no}: path not in the repository: {m.group(1).rstrip('.,:;')!r}"
                           f" in {piece.strip()!r}")
    return sorted(out, key=lambda p: int(p.split(":")[1]))


@pytest.mark.parametrize("rel", _files())
def test_source_hygiene(rel):
    found = problems(rel)
    assert not found, "\n".join(found)


def test_the_checks_catch_what_they_should(tmp_path):
    """Each kind of problem is found on its line; existing paths, globs that match and paths
    in plain strings or C string literals are not reported."""
    (tmp_path / "comms").mkdir()
    (tmp_path / "comms" / "real.py").write_text("")
    (tmp_path / "comms" / "bad.py").write_text(
        '"""Module text: see comms/real.py and comms/gone.py."""\n'
        "X = 1  # measured 2026-11-23, commit 9dd3a1f\n"
        "# found by review; see DESIGN.md and ../shared/BASELINES.md\n"
        "S = 'comms/also_gone.py is a plain string, not a docstring'\n"
        "T = (\n    'comms/gone_too.py, a piece of a string'\n    'joined to this one'\n)\n"
        "# glob comms/*.py matches, comms/nothing*.py does not\n"
        "def f():\n    \"\"\"Function docstring: comms/gone_in_function.py.\"\"\"\n")
    (tmp_path / "comms" / "bad.c").write_text(
        "/* see native/src/gone.c */\n"
        'const char *s = "/* not a comment: native/x.c */"; // 2026-01-02\n')
    py = problems("comms/bad.py", tmp_path)
    lines = {p.split(": ")[0] + ": " + p.split(": ")[1] for p in py}
    assert lines == {"comms/bad.py:1: path not in the repository",
                     "comms/bad.py:2: a date", "comms/bad.py:2: a commit id",
                     "comms/bad.py:3: history ('found by review')",
                     "comms/bad.py:3: a document that is not in the repository",
                     "comms/bad.py:9: path not in the repository",
                     "comms/bad.py:11: path not in the repository"}, py
    paths = [p for p in py if "path not in" in p]
    assert len(paths) == 3 and "'comms/gone.py'" in paths[0]
    assert "'comms/nothing*.py'" in paths[1] and "'comms/gone_in_function.py'" in paths[2]
    assert sum("a document" in p for p in py) == 3
    c = problems("comms/bad.c", tmp_path)
    assert len(c) == 2, c
    assert c[0].startswith("comms/bad.c:1: path") and "native/src/gone.c" in c[0]
    assert c[1].startswith("comms/bad.c:2: a date") and "2026-01-02" in c[1]
