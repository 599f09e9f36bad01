"""The documentation site: it builds without a warning (``mkdocs build --strict``), its API
reference holds every public name and its CLI reference every command, and the Python examples
of every page run offline, in order, as a reader would paste them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import autonorm
from autonorm.cli import _plain_parser
from tests.conftest import REPO

DOCS = REPO / "docs"
#: The line right before a code fence that keeps the block from running, with the reason.
SKIP = re.compile(r"<!--\s*skip:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """``(line, code)`` of each Python block of ``page`` that is not marked to skip."""
    blocks: list[tuple[int, str]] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if opening is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        skipped = i > 0 and SKIP.search(lines[i - 1])
        if opening.group(1) in ("python", "py") and not skipped:
            blocks.append((i + 1, "\n".join(lines[i + 1 : end])))
        i = end + 1
    return blocks


PAGES = sorted(p for p in DOCS.rglob("*.md") if python_blocks(p))


def test_the_docs_have_runnable_examples():
    assert len(PAGES) >= 5, "the pages lost their examples or the fence syntax changed"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_the_python_examples_of_a_page_run(page, tmp_path):
    """All blocks of a page in one process, one namespace, in order, in an empty folder (with
    the repository's examples importable); a failure names the block's line."""
    script = ["import sys", f"sys.path.insert(0, {str(REPO)!r})", "__ns = {}"]
    for line, code in python_blocks(page):
        script.append(f"print('block at line {line}', file=sys.stderr, flush=True)")
        script.append(f"exec(compile({code!r}, '{page.name}:{line}', 'exec'), __ns)")
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1",
            "PATH": str(Path(sys.executable).parent),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built as CI builds it: any warning (a broken link or reference) fails."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_the_api_reference_documents_every_public_name(site):
    pages = "".join(p.read_text() for p in site.rglob("*.html"))
    missing = [
        name
        for name in autonorm.__all__
        if name != "__version__" and f'id="autonorm.{name}"' not in pages
    ]
    assert not missing, f"not in the API reference: {missing}"


def test_the_cli_reference_shows_every_command_with_its_options(site):
    page = (site / "cli" / "index.html").read_text()
    commands = _plain_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in commands:
        assert f"autonorm {command}" in page
    # generated from the parsers, not written by hand: options of each appear as --help shows them
    for option in ("--search.budget.trainings", "--search.include", "--study-name", "--onnx"):
        assert option in page


MAIN_JOB = (
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q "
    "-e '.[examples,dashboard]' && .venv/bin/autonorm search --config "
    "examples/mnist1d_cnn/search.yaml"
)
TESTS = (
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q "
    "-e '.[dev]' && .venv/bin/python -m pytest"
)


def test_the_readme_is_a_first_visit_with_its_two_commands():
    """Short (the rest lives in the docs), its two set-up commands as they were, the test
    command the one CI runs, and every link into the docs resolving to a file."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    bash = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert bash[:2] == [MAIN_JOB, TESTS]
    assert TESTS in (REPO / ".ci" / "run").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and all((REPO / link).exists() for link in links)
