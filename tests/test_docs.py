"""docs/*.md: every code block runs (or is notation), every path they name exists, and code docstrings point into
the repository's own documents, never outside it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
RUNNABLE = ("python", "bash")
NOTATION = ("", "text")
CODE_DIRS = ("flowalign", "pipelines", "rewards")


def blocks(path: Path):
    return [(lang, code) for lang, code in FENCE.findall(path.read_text())]


def test_docs_exist():
    assert {p.name for p in DOCS} >= {"algorithms.md", "benchmarks.md"}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_block_is_run_or_is_notation(path):
    """A block is python / bash (run below) or notation (untagged / text); notation that parses as Python is
    code that would go stale untested: tag it python."""
    for lang, code in blocks(path):
        assert lang in RUNNABLE + NOTATION, f"{path.name}: a ```{lang} block; use python, bash or text"
        if lang in NOTATION:
            with pytest.raises(SyntaxError):
                compile(code, path.name, "exec")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for index, (lang, code) in enumerate(blocks(path)):
        if lang == "python":
            code = code.replace("samples/", f"{ROOT / 'samples'}/")
            exec(compile(code, f"{path.name} python block {index}", "exec"), namespace)  # noqa: S102 (the docs run as written)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_bash_blocks_run(path, tmp_path):
    for lang, code in blocks(path):
        if lang != "bash":
            continue
        for line in [l for l in code.replace("\\\n", " ").splitlines() if l.strip() and not l.startswith("#")]:
            assert line.startswith("flowalign "), f"{path.name}: only flowalign commands are run here: {line}"
            args = line.replace("samples/", f"{ROOT / 'samples'}/").split()[1:]
            proc = subprocess.run([sys.executable, "-m", "flowalign.cli", *args], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=900, check=False)
            assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"


PATH_IN_TEXT = re.compile(r"`((?:docs|samples|flowalign|pipelines|rewards|tests)/[\w./-]+\.(?:md|yaml|py|png|csv|txt|json))`")


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_named_files_exist(path):
    missing = [p for p in PATH_IN_TEXT.findall(path.read_text()) if not (ROOT / p).exists()]
    assert not missing, f"{path.name} names files that are not in the repository: {missing}"


def _python_files():
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))


OUTSIDE = re.compile(r"shared/design|README, \"|\"Training\" under Benchmarks|README\.md, section")


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docstrings_point_into_the_repository(path):
    """Derivations and measurements are cited as docs/algorithms.md / docs/benchmarks.md, not as a folder outside
    the repository (``shared/design/...``) or a README section that moved to docs/."""
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if OUTSIDE.search(line)]
    assert not hits, "point these at docs/algorithms.md or docs/benchmarks.md:\n" + "\n".join(hits)
