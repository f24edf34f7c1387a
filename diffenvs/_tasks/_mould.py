from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._constants import param
from .._control import AbstractControlTask


class Mould(AbstractControlTask):
    """Fungicide against a mould population (Lenhart & Workman 2007, ch. 6).

    State: mould concentration x in [0, 5]. Control: fungicide u in [0, 5].
    x' = r (M - x) - u x; cost g = A x^2 + u^2; T = 5. Explicit Euler is unstable
    for dt > 2 / 5.3 (horizon < 14) when u is near 5; the state bounds keep it finite.
    """

    r: Float[Array, ""] = param(0.3)
    carrying: Float[Array, ""] = param(10.0)
    weight: Float[Array, ""] = param(10.0)

    name: ClassVar[str] = "mould"
    state_dim: ClassVar[int] = 1
    action_dim: ClassVar[int] = 1
    duration: ClassVar[float] = 5.0
    x0: ClassVar[tuple[float, ...]] = (1.0,)
    u_lo: ClassVar[tuple[float, ...]] = (0.0,)
    u_hi: ClassVar[tuple[float, ...]] = (5.0,)
    x_lo: ClassVar[tuple[float, ...] | None] = (0.0,)
    x_hi: ClassVar[tuple[float, ...] | None] = (5.0,)

    def vector_field(self, t, x, u) -> Float[Array, " state"]:
        return self.r * (self.carrying - x) - u * x

    def running_cost(self, t, x, u) -> Scalar:
        return self.weight * x[0] ** 2 + u[0] ** 2

    def terminal_cost(self, x) -> Scalar:
        del x
        return jnp.zeros(())
