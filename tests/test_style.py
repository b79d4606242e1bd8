"""The lint contract the project holds itself to (ruff.toml; CI runs `ruff check .` first)."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(ROOT.glob("*.py"))
# Lines over 100 characters: at most 5% of a file's (nanoGPT and DiT have 3-4%).
LONG, DENSITY = 100, 0.05


def long_lines(path):
    """(lines over LONG characters, lines) of a file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return sum(len(line) > LONG for line in lines), len(lines)


def ruff():
    """The command that runs ruff here, or None: the executable, else the module."""
    if shutil.which("ruff"):
        return ["ruff"]
    module = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if module.returncode == 0:
        return [sys.executable, "-m", "ruff"]
    return None


def test_ruff_passes():
    command = ruff()
    if command is None:
        pytest.skip("ruff is not installed (pip install -r requirements.txt installs it)")
    out = subprocess.run([*command, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_at_most_5_percent_of_a_files_lines_are_over_100_characters(path):
    over, total = long_lines(path)
    assert over <= DENSITY * total, f"{path.name}: {over} of {total} lines over {LONG} characters"


def test_at_most_5_percent_of_all_lines_are_over_100_characters():
    over, total = (sum(x) for x in zip(*map(long_lines, SOURCES)))
    assert SOURCES and over <= DENSITY * total, f"{over} of {total} lines over {LONG} characters"


def test_no_conditional_expression_is_a_statement():
    """`a() if c else b()` on a line of its own reads as a statement: an if/else says it plainly."""
    found = []
    for path in [*SOURCES, *sorted((ROOT / "tests").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.IfExp):
                found.append(f"{path.name}:{node.lineno}")
    assert found == []


# The commands the README runs; everything else at the top level is a library they import.
SCRIPTS = {"train", "sample", "bench", "study", "fid", "prepare_data", "export"}


def imported(path):
    """The top-level names a file imports, at its head or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_a_script():
    """Scripts never import each other, nor does a library import a script: one home per concern."""
    found = {p.stem: sorted(imported(p) & SCRIPTS - {p.stem}) for p in SOURCES}
    assert SCRIPTS <= set(found) and {k: v for k, v in found.items() if v} == {}
