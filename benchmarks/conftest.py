"""The benchmark suite: skipped unless `pytest benchmarks --benchmark` is given.

Timings never belong in the test suite (machines are noisy), so everything under
`benchmarks/` is collected but skipped by default. Each benchmark writes its numbers as
JSON (and, where a reader would rather look, a PNG) under `benchmarks/results/`, and
prints a summary at the end of the run whether or not output capture is on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

# One JAX CPU device per core, set before JAX starts: a benchmark can then split a
# batch over the cores (data parallelism). Computations not placed explicitly run
# on the first device, as without this flag.
_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _FLAGS:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    os.environ["XLA_FLAGS"] = (
        f"{_FLAGS} --xla_force_host_platform_device_count={_cores}".strip()
    )

BENCHMARKS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS_DIR / "results"

_SUMMARY_KEY = pytest.StashKey[list[tuple[str, list[str]]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    # pytest-benchmark registers many `--benchmark-*` options; pytest parses with
    # `allow_abbrev=False`, so this exact flag never clashes with them.
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the speed benchmarks under benchmarks/ (skipped without it).",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SUMMARY_KEY] = []


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(
        reason="benchmarks run only with `pytest benchmarks --benchmark`"
    )
    for item in items:
        # This hook sees every collected item, not only those under benchmarks/.
        if BENCHMARKS_DIR in item.path.resolve().parents:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    for title, lines in config.stash.get(_SUMMARY_KEY, []):
        terminalreporter.write_sep("=", title)
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def results_dir() -> Path:
    """The results folder `benchmarks/results/`, created if missing."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR


def write_json(path: Path, numbers: dict[str, Any]) -> Path:
    """Write `numbers` to the JSON file `path`, merged into what is already there.

    Top-level sections that are dicts are merged key by key, so that a run of a few
    benchmarks (`-k ...`) updates their entries and keeps the others. The file is
    replaced atomically.
    """
    merged: dict[str, Any] = {}
    if path.exists():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError:
            merged = {}
    for key, value in numbers.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def write_results(results_dir: Path) -> Callable[[str, dict[str, Any]], Path]:
    """A function `write_results(name, numbers)` that merges `numbers` into
    `benchmarks/results/<name>.json` and returns the path."""

    def write(name: str, numbers: dict[str, Any]) -> Path:
        return write_json(results_dir / f"{name}.json", numbers)

    return write


@pytest.fixture(scope="session")
def summary(
    pytestconfig: pytest.Config,
) -> Callable[[str, Sequence[str]], None]:
    """A function `summary(title, lines)` whose lines are printed at the end of the
    run (in the terminal summary, so with or without `-s`)."""

    def add(title: str, lines: Sequence[str]) -> None:
        pytestconfig.stash[_SUMMARY_KEY].append((title, list(lines)))

    return add
