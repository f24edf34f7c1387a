"""Recurrent backbones: a stacked LSTM and a stacked vanilla tanh RNN."""

from __future__ import annotations

import abc

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


class _Stacked(AbstractBackbone):
    """Layers of recurrent cells; layer l reads the hidden state of layer l-1.

    Args:
        in_size: width of the input rows.
        hidden_size: width of every layer's hidden state.
        depth: number of layers.
        key: PRNG key for the initial weights.
    """

    cells: tuple[eqx.nn.LSTMCell | _TanhCell, ...]
    in_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        hidden_size: int = 64,
        depth: int = 2,
        *,
        key: PRNGKeyArray,
    ):
        check_positive(in_size=in_size, hidden_size=hidden_size, depth=depth)
        keys = jr.split(key, depth)
        sizes = [in_size] + [hidden_size] * (depth - 1)
        self.cells = tuple(
            self._cell(size, hidden_size, key=k)
            for size, k in zip(sizes, keys, strict=True)
        )
        self.in_size = in_size
        self.out_size = hidden_size

    @staticmethod
    @abc.abstractmethod
    def _cell(
        in_size: int, hidden_size: int, *, key: PRNGKeyArray
    ) -> eqx.nn.LSTMCell | _TanhCell:
        """One layer's cell."""

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


class LSTM(_Stacked):
    """A stack of LSTM layers (the papers' default: 2 layers of 64), built from
    `in_size`, `hidden_size`, `depth` and `key`."""

    __init__ = _Stacked.__init__

    @staticmethod
    def _cell(in_size: int, hidden_size: int, *, key: PRNGKeyArray):
        return eqx.nn.LSTMCell(in_size, hidden_size, key=key)

    def init(self, horizon: int):
        del horizon
        zeros = jnp.zeros(self.out_size)
        return tuple((zeros, zeros) for _ in self.cells)


class RNN(_Stacked):
    """A stack of vanilla tanh RNN layers (the papers' default: 2 layers of 64),
    built from `in_size`, `hidden_size`, `depth` and `key`."""

    __init__ = _Stacked.__init__

    @staticmethod
    def _cell(in_size: int, hidden_size: int, *, key: PRNGKeyArray):
        return _TanhCell(in_size, hidden_size, key=key)

    def init(self, horizon: int):
        del horizon
        return tuple(jnp.zeros(self.out_size) for _ in self.cells)
