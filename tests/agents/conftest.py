"""Fixtures of the agents tests."""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop this module's compiled programs when it ends.

    The agents' training chunks are the largest programs of the suite; in one
    process with every other test folder, XLA's CPU compiler crashed (SIGSEGV)
    while compiling a later float64 transformer gradient
    (tests/worldmodels/test_rollout.py), which passes on its own and after the
    agents tests alone.
    """
    yield
    jax.clear_caches()
    gc.collect()
