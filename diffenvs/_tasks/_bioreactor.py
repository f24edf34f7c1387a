from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._constants import param
from .._control import AbstractControlTask


class Bioreactor(AbstractControlTask):
    """Feeding bacteria that degrade a contaminant (Lenhart & Workman 2007, ch. 19).

    State: bacteria concentration x in [0, 1]. Control: nutrient u in [0, 1].
    x' = G u x - D x^2; the task maximises K x - u, so g = -(K x - u); T = 2.
    With these constants the optimum is u = 0 throughout (action -1).
    """

    growth: Float[Array, ""] = param(1.0)
    decay: Float[Array, ""] = param(1.0)
    weight: Float[Array, ""] = param(2.0)

    name: ClassVar[str] = "bioreactor"
    state_dim: ClassVar[int] = 1
    action_dim: ClassVar[int] = 1
    duration: ClassVar[float] = 2.0
    x0: ClassVar[tuple[float, ...]] = (0.5,)
    u_lo: ClassVar[tuple[float, ...]] = (0.0,)
    u_hi: ClassVar[tuple[float, ...]] = (1.0,)
    x_lo: ClassVar[tuple[float, ...] | None] = (0.0,)
    x_hi: ClassVar[tuple[float, ...] | None] = (1.0,)

    def vector_field(self, t, x, u) -> Float[Array, " state"]:
        return self.growth * u * x - self.decay * x**2

    def running_cost(self, t, x, u) -> Scalar:
        return -(self.weight * x[0] - u[0])

    def terminal_cost(self, x) -> Scalar:
        del x
        return jnp.zeros(())
