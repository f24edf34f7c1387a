"""The Python code blocks of the README and docs/ run as written.

Each document's blocks run in order in one namespace, as a reader would paste
them. Only the training budgets are cut, so that the suite stays fast: `BPO.train`
runs one chunk of two episodes (one of warm-up) whatever `env_steps` says, and
`worldmodels.fit` at most `FIT_STEPS` steps; every other line, argument and shape
is the document's.
`DOCS_AS_WRITTEN=1` runs them with their own budgets (minutes). A block whose
info string is `python fragment` illustrates a signature and is not run, but like
every block it is parsed, and every public name it reads from the packages
(`diffenvs.make`, `worldmodels.Episodes.from_env`, ...) must exist.
"""

from __future__ import annotations

import ast
import copy
import importlib
import os
import pathlib
import re

import pytest

import agents
import worldmodels

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("diffenvs", "worldmodels", "agents")
FENCE = re.compile(r"^```python( fragment)?\n(.*?)^```", re.MULTILINE | re.DOTALL)
FIT_STEPS = 20


def _blocks() -> list:
    return [
        pytest.param(match.group(2), id=f"{document.name}-{number}")
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


def _runnable(document: pathlib.Path) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(document.read_text()) if not m.group(1)]


@pytest.fixture
def short_training(monkeypatch):
    """`BPO.train` for one chunk and `fit` for at most `FIT_STEPS` steps, unless
    `DOCS_AS_WRITTEN` is set."""
    if os.environ.get("DOCS_AS_WRITTEN"):
        return
    train, fit = agents._train.train, worldmodels.fit

    def one_chunk(bpo, key, env_steps, **options):
        # One chunk of two episodes: the first of warm-up, the second with updates.
        short = copy.copy(bpo)
        budget = {"warmup_steps": bpo.horizon, "eval_every": 2 * bpo.horizon}
        for name, value in budget.items():
            object.__setattr__(short, name, min(getattr(bpo, name), value))
        return train(short, key, 1, **options)

    def few_steps(*args, steps=1000, **options):
        return fit(*args, steps=min(steps, FIT_STEPS), **options)

    monkeypatch.setattr(agents._train, "train", one_chunk)
    monkeypatch.setattr(worldmodels, "fit", few_steps)


def _run(blocks: list[str], name: str) -> None:
    """Run `blocks` in order in one namespace, as a reader pastes them."""
    namespace: dict = {"__name__": f"docs_{name}"}
    for number, source in enumerate(blocks, 1):
        exec(compile(source, f"{name}, block {number}", "exec"), namespace)


@pytest.mark.parametrize(
    "document", [d for d in DOCUMENTS if _runnable(d)], ids=lambda d: d.name
)
def test_a_document_runs_as_written(document, short_training, capsys):
    _run(_runnable(document), document.name)


def test_the_runner_catches_a_block_that_fails():
    """A later block that reads a name no earlier block defined fails, and so does
    a call with a keyword the function does not take."""
    _run(["import diffenvs\nenv = diffenvs.make('hiv', horizon=5)", "env.dt"], "ok")
    with pytest.raises(NameError, match="model"):
        _run(["import diffenvs", "model.predict(None, None)"], "undefined")
    with pytest.raises(TypeError, match="horizont"):
        _run(["import diffenvs\ndiffenvs.make('hiv', horizon=5, horizont=5)"], "kw")
