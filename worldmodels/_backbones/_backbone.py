"""The interface shared by the sequence backbones of the world models."""

from __future__ import annotations

import abc

import equinox as eqx
import jax
from jaxtyping import Array, Float, PyTree


class AbstractBackbone(eqx.Module):
    """A causal sequence-to-sequence network: output row t depends on input rows
    0 ... t only.

    It runs two ways that agree to float tolerance: in parallel over a whole
    sequence (`__call__`, what training and `predict` use) and one step at a time
    from a carry (`init`, `step`, what closed-loop generation uses).
    """

    in_size: eqx.AbstractVar[int]
    out_size: eqx.AbstractVar[int]

    @abc.abstractmethod
    def __call__(
        self, inputs: Float[Array, "time in_size"]
    ) -> Float[Array, "time out_size"]:
        """The outputs for a whole sequence, shape `(time, out_size)`."""

    @abc.abstractmethod
    def init(self, horizon: int) -> PyTree:
        """The carry before the first step of a sequence of at most `horizon`
        steps."""

    @abc.abstractmethod
    def step(
        self, carry: PyTree, x: Float[Array, " in_size"]
    ) -> tuple[PyTree, Float[Array, " out_size"]]:
        """Consume one input row; return the new carry and the output row."""


def check_positive(**sizes: object) -> None:
    """Raise a `ValueError` naming the first size that is not a positive int."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")


def dense(layer: eqx.nn.Linear, x: Float[Array, "time in"]) -> Float[Array, "time out"]:
    """`layer` applied to every row of `x`, as one matrix product."""
    return affine(x, layer.weight, layer.bias)


def affine(
    x: Float[Array, "time in"],
    weight: Float[Array, "out in"],
    bias: Float[Array, " out"] | None,
) -> Float[Array, "time out"]:
    """`x @ weight.T + bias` for every row of `x`, as one matrix product."""
    # One product for the whole sequence, with the bias add fused into it; a
    # `jax.vmap` of the per-row layer does not always compile to that on CPU.
    y = jax.lax.dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())))
    return y if bias is None else y + bias
