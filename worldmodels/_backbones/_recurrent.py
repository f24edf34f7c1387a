"""Recurrent backbones: a stacked LSTM and a stacked vanilla tanh RNN."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._backbone import AbstractBackbone, check_positive


class _TanhCell(eqx.Module):
    """h' = tanh(W_x x + W_h h + b), the cell of eq. 4's family (arXiv §4.2)."""

    input: eqx.nn.Linear
    hidden: eqx.nn.Linear

    def __init__(self, in_size: int, hidden_size: int, *, key: PRNGKeyArray):
        input_key, hidden_key = jr.split(key)
        self.input = eqx.nn.Linear(in_size, hidden_size, key=input_key)
        self.hidden = eqx.nn.Linear(
            hidden_size, hidden_size, use_bias=False, key=hidden_key
        )

    def __call__(self, x: Array, h: Array) -> Array:
        return jnp.tanh(self.input(x) + self.hidden(h))


class _AbstractStacked(AbstractBackbone):
    """Layers of recurrent cells; layer l reads the hidden state of layer l-1."""

    cells: eqx.AbstractVar[tuple[eqx.Module, ...]]

    def __call__(
        self, inputs: Float[Array, "time in_size"]
    ) -> Float[Array, "time out_size"]:
        # A recurrence has no parallel form: the sequence is the scan of `step`.
        _, outputs = jax.lax.scan(
            lambda carry, x: self.step(carry, x), self.init(inputs.shape[0]), inputs
        )
        return outputs

    def step(self, carry, x):
        new_carry = []
        for cell, state in zip(self.cells, carry, strict=True):
            state = cell(x, state)
            new_carry.append(state)
            x = state[0] if isinstance(state, tuple) else state
        return tuple(new_carry), x


def _stack(cell, in_size: int, hidden_size: int, depth: int, key: PRNGKeyArray):
    """`depth` cells built by `cell(in_size, hidden_size, key=...)`, the first
    reading the input rows and the others the hidden state below."""
    check_positive(in_size=in_size, hidden_size=hidden_size, depth=depth)
    sizes = [in_size] + [hidden_size] * (depth - 1)
    keys = jr.split(key, depth)
    return tuple(
        cell(size, hidden_size, key=k) for size, k in zip(sizes, keys, strict=True)
    )


class LSTM(_AbstractStacked):
    """A stack of LSTM layers (the papers' default: 2 layers of 64).

    Args:
        in_size: width of the input rows.
        hidden_size: width of every layer's hidden state.
        depth: number of layers.
        key: PRNG key for the initial weights.
    """

    cells: tuple[eqx.nn.LSTMCell, ...]
    in_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)

    def __init__(
        self, in_size: int, hidden_size: int = 64, depth: int = 2, *, key: PRNGKeyArray
    ):
        self.cells = _stack(eqx.nn.LSTMCell, in_size, hidden_size, depth, key)
        self.in_size = in_size
        self.out_size = hidden_size

    def init(self, horizon: int):
        del horizon
        zeros = jnp.zeros(self.out_size)
        return tuple((zeros, zeros) for _ in self.cells)


class RNN(_AbstractStacked):
    """A stack of vanilla tanh RNN layers (the papers' default: 2 layers of 64).

    Args:
        in_size: width of the input rows.
        hidden_size: width of every layer's hidden state.
        depth: number of layers.
        key: PRNG key for the initial weights.
    """

    cells: tuple[_TanhCell, ...]
    in_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)

    def __init__(
        self, in_size: int, hidden_size: int = 64, depth: int = 2, *, key: PRNGKeyArray
    ):
        self.cells = _stack(_TanhCell, in_size, hidden_size, depth, key)
        self.in_size = in_size
        self.out_size = hidden_size

    def init(self, horizon: int):
        del horizon
        return tuple(jnp.zeros(self.out_size) for _ in self.cells)
