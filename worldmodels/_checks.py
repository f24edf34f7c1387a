"""Checks of the arguments that the public functions of `worldmodels` share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_key(key: object, name: str = "key") -> None:
    """Raise a `TypeError` naming `name` unless `key` is a PRNG key, typed
    (`jax.random.key`) or legacy (`jax.random.PRNGKey`, `uint32` of shape `(2,)`)."""
    if isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,))
    ):
        return
    raise TypeError(
        f"{name} must be a PRNG key such as jax.random.key(0), got {key!r}."
    )


def array_if_possible(value: object) -> object:
    """A field converter: `value` as a JAX array, or unchanged when it cannot be one,
    so that `__check_init__` can name what was given."""
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError):
        return value
