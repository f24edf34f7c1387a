"""Runtime errors that survive differentiation.

`eqx.error_if` returns its input unchanged and passes tangents straight through. Under
`jax.grad` the primal output is often not needed (a reward linear in the state needs
no saved state for its backward pass), so the check is dead code and XLA removes it:
a NaN action then gives a NaN gradient without a word. Here the tangent is also
multiplied by a scalar one that carries the same check, so the check runs whenever
the value or a derivative is computed.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _checked(x: PyTree, pred: Array, index: Array, msgs: tuple[str, ...]) -> PyTree:
    return eqx.branched_error_if(x, pred, index, msgs)


@_checked.defjvp
def _checked_jvp(msgs, primals, tangents):
    x, pred, index = primals
    # The check once more on a scalar, whose exact 1 multiplies the tangents. (Tying
    # the value to that scalar as well, by updating one element in place, is much
    # slower under `jax.vmap`.)
    one = eqx.branched_error_if(jnp.ones(()), pred, index, msgs)
    tangent = jax.tree.map(lambda t: t * one.astype(t.dtype), tangents[0])
    return eqx.branched_error_if(x, pred, index, msgs), tangent


def branched_error_if(
    x: PyTree[ArrayLike], pred: ArrayLike, index: ArrayLike, msgs: tuple[str, ...]
) -> PyTree[Array]:
    """`eqx.branched_error_if` whose check also runs in every derivative of the
    result: for checks inside a task's or a model's computation that must not
    vanish under `jax.grad`.

    Args:
        x: a pytree of floating-point arrays, returned unchanged.
        pred: a boolean scalar; where it is true, evaluating the result (or any
            derivative of it) raises.
        index: an integer scalar choosing the message.
        msgs: the messages, one per value of `index`.

    Returns:
        `x`, as arrays, tied to the check.
    """
    x = jax.tree.map(jnp.asarray, x)
    return _checked(x, jnp.asarray(pred), jnp.asarray(index), tuple(msgs))


def error_if(x: PyTree[ArrayLike], pred: ArrayLike, msg: str) -> PyTree[Array]:
    """`eqx.error_if` whose check also runs in every derivative of the result.

    For example `actions = diffenvs.error_if(actions, jnp.any(jnp.isnan(actions)),
    "actions contain NaN.")` raises under `jax.grad` of a loss of `actions` too,
    where `eqx.error_if`'s check can be removed as dead code. Works under `jax.jit`
    and `jax.vmap`. Arguments as `branched_error_if`, with one message `msg`.
    """
    return branched_error_if(x, pred, 0, (msg,))


def check_key(key: object, name: str = "key") -> None:
    """Raise a `TypeError` naming `name` unless `key` is a PRNG key: a typed key
    (`jax.random.key`) or a legacy `uint32` key (`jax.random.PRNGKey`)."""
    typed = isinstance(key, jax.Array) and jnp.issubdtype(
        key.dtype, jax.dtypes.prng_key
    )
    legacy = (
        isinstance(key, jax.Array)
        and key.dtype == jnp.uint32
        and key.shape[-1:] == (2,)
    )
    if not (typed or legacy):
        raise TypeError(
            f"{name} must be a PRNG key such as jax.random.key(0), got {key!r}."
        )


def as_array_or_same(value: object) -> object:
    """`jnp.asarray(value)`, or `value` itself when it cannot be an array, so that a
    check can name it (a field converter)."""
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError):
        return value
