"""The Python code blocks of the README and docs/ stay in step with the API.

Running them all is too slow for the test suite (some train for minutes), so each
block is parsed, and every public name it reads from the packages
(`diffenvs.make`, `worldmodels.Episodes.from_env`, ...) must exist.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("diffenvs", "worldmodels", "agents")
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list:
    return [
        pytest.param(match.group(1), id=f"{document.name}-{number}")
        for document in DOCUMENTS
        for number, match in enumerate(FENCE.finditer(document.read_text()), 1)
    ]


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for an attribute chain rooted at a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _missing(source: str) -> list[str]:
    """The package names that `source` reads and that do not exist."""
    tree = ast.parse(source)
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in PACKAGES:
            module = importlib.import_module(node.module)
            missing += [
                f"{node.module}.{a.name}"
                for a in node.names
                if not hasattr(module, a.name)
            ]
        name = _dotted(node) if isinstance(node, ast.Attribute) else None
        if name is None or name.split(".")[0] not in PACKAGES:
            continue
        value: object = importlib.import_module(name.split(".")[0])
        for part in name.split(".")[1:]:
            if not hasattr(value, part):
                missing.append(name)
                break
            value = getattr(value, part)
    return missing


def test_there_are_blocks_to_check():
    assert len(_blocks()) >= 10


@pytest.mark.parametrize("source", _blocks())
def test_a_code_block_uses_only_names_that_exist(source):
    assert not _missing(source)


def test_the_check_catches_a_renamed_function():
    assert _missing("import diffenvs\ndiffenvs.make_env('hiv')\n") == [
        "diffenvs.make_env"
    ]
    assert _missing("from worldmodels import Episode\n") == ["worldmodels.Episode"]
