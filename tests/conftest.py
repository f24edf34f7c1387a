"""Fixtures and Hypothesis profiles shared by every test folder.

Hypothesis profiles, chosen with the environment variable `HYPOTHESIS_PROFILE`:

* `default`: a few examples per property, derandomised so that a failure in CI is
  reproduced exactly by the next run;
* `thorough`: many random examples, for a long run before a release.

Both set `deadline=None`: the first example of a property pays for compilation,
which no per-example deadline can sensibly bound.
"""

import os

import jax
import jax.random as jr
import pytest
from hypothesis import settings

settings.register_profile(
    "default", deadline=None, max_examples=10, derandomize=True, database=None
)
settings.register_profile("thorough", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def x64():
    """Run the test with float64 enabled.

    Build the task inside the test, not outside: a task's constants take the dtype
    that is the default when it is constructed.
    """
    with jax.enable_x64(True):
        yield


@pytest.fixture
def key():
    """A fixed PRNG key, so that every random draw of a test is reproducible."""
    return jr.key(0)
