"""Checks of static input (the horizon, the shapes and precision of arrays) and the
finiteness test that the checks of bad data share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike


def as_horizon(horizon: object) -> object:
    """A NumPy integer as a Python int, so that the static shape is unambiguous;
    anything else as it is, for `check_horizon` to name."""
    if isinstance(horizon, np.integer) and not isinstance(horizon, np.bool_):
        return int(horizon)
    return horizon


def check_horizon(horizon: object) -> None:
    """Raise unless `horizon` is a positive Python int."""
    # bool is an int subclass but never a meaningful horizon.
    if isinstance(horizon, bool) or not isinstance(horizon, int):
        raise TypeError(
            f"horizon must be a positive int (the number of control steps), "
            f"got {horizon!r} of type {type(horizon).__name__}."
        )
    if horizon <= 0:
        raise ValueError(f"horizon must be a positive int, got horizon={horizon}.")


def promote(x: ArrayLike) -> Array:
    """`x` as an array in the default floating-point precision at least (float64
    under x64), so that a time loop's carry keeps one type."""
    default = jax.dtypes.canonicalize_dtype(jnp.float64)
    return jnp.asarray(x, jnp.promote_types(jnp.result_type(x), default))


def check_shape(
    value: Array, expected: tuple[int, ...], what: str, task: str, hint: str = ""
) -> None:
    """Raise a `ValueError` unless `value` has the shape `expected`.

    Args:
        value: the array.
        expected: its shape.
        what: the argument and its shape in words, e.g. "s1 must have shape
            (state_dim,)".
        task: the task's name.
        hint: appended to the message, e.g. "; batch with jax.vmap".
    """
    if value.shape != expected:
        raise ValueError(
            f"{what} = {expected} for task {task!r}, got shape {value.shape}{hint}."
        )


def all_finite(x: Array) -> Array:
    """Whether every entry of `x` is finite, a boolean scalar."""
    return jnp.all(jnp.isfinite(x))
