from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._constants import param
from .._control import AbstractControlTask


class Bacteria(AbstractControlTask):
    """Growing bacteria with a nutrient whose by-product harms them (Lenhart &
    Workman 2007, ch. 7).

    State: concentration x in [0, 10]. Control: nutrient u in [0, 2].
    x' = r x + A u x - B u^2 e^{-x}; running cost g = u^2; terminal cost
    g_T = -C x_H (the task maximises C x(T) - integral of u^2); T = 1. Under the
    state bounds x = 0 is absorbing.
    """

    r: Float[Array, ""] = param(1.0)
    a: Float[Array, ""] = param(1.0)
    b: Float[Array, ""] = param(12.0)
    c: Float[Array, ""] = param(1.0)

    name: ClassVar[str] = "bacteria"
    state_dim: ClassVar[int] = 1
    action_dim: ClassVar[int] = 1
    duration: ClassVar[float] = 1.0
    x0: ClassVar[tuple[float, ...]] = (1.0,)
    u_lo: ClassVar[tuple[float, ...]] = (0.0,)
    u_hi: ClassVar[tuple[float, ...]] = (2.0,)
    x_lo: ClassVar[tuple[float, ...] | None] = (0.0,)
    x_hi: ClassVar[tuple[float, ...] | None] = (10.0,)

    def vector_field(self, t, x, u) -> Float[Array, " state"]:
        return self.r * x + self.a * u * x - self.b * u**2 * jnp.exp(-x)

    def running_cost(self, t, x, u) -> Scalar:
        return u[0] ** 2

    def terminal_cost(self, x) -> Scalar:
        return -self.c * x[0]
