"""Hashing a pytree by value, so that modules holding arrays can be hashed."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def tree_hash(tree: Any) -> int:
    """A hash of `tree` by value: its structure, its non-array leaves and the
    dtype, shape and bytes of its arrays; equal under `eqx.tree_equal` means equal
    hashes.

    A task or a world model hashes this way, so `jax.jit(env.step)` and
    `jax.jit(model.predict)` can cache on the bound method (the arrays are then
    constants of the compiled program).

    Raises:
        TypeError: if a leaf is a traced value.
    """
    leaves, treedef = jax.tree.flatten(tree)
    return hash((treedef, tuple(_hashable(leaf) for leaf in leaves)))


def _hashable(leaf: Any) -> Any:
    if isinstance(leaf, jax.core.Tracer):
        raise TypeError(
            f"{type(leaf).__name__}: a module whose arrays are traced values cannot "
            f"be hashed, so it cannot be the subject of jax.jit(module.method); "
            f"pass it as an argument of the jitted function instead."
        )
    if isinstance(leaf, bool | int | float | complex) or not eqx.is_array_like(leaf):
        return leaf
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    array = np.asarray(leaf)
    if jnp.issubdtype(array.dtype, jnp.inexact):
        array = array + 0  # -0.0 == 0.0, so the two must hash alike
    return (array.dtype.str, array.shape, array.tobytes())
