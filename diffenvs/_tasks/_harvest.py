from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._constants import param
from .._control import AbstractControlTask


class Harvest(AbstractControlTask):
    """Harvesting a population whose individuals grow (Lenhart & Workman 2007,
    ch. 11).

    State: population x (unbounded). Control: harvest rate u in [0, 1].
    x' = -(m + u) x; the task maximises A (k t / (t + 1)) x u - u^2, so
    g = -(A k t / (t + 1) x u - u^2); T = 10.
    """

    mortality: Float[Array, ""] = param(0.2)
    a: Float[Array, ""] = param(5.0)
    k: Float[Array, ""] = param(10.0)

    name: ClassVar[str] = "harvest"
    state_dim: ClassVar[int] = 1
    action_dim: ClassVar[int] = 1
    duration: ClassVar[float] = 10.0
    x0: ClassVar[tuple[float, ...]] = (0.4,)
    u_lo: ClassVar[tuple[float, ...]] = (0.0,)
    u_hi: ClassVar[tuple[float, ...]] = (1.0,)

    def vector_field(self, t, x, u) -> Float[Array, " state"]:
        return -(self.mortality + u) * x

    def running_cost(self, t, x, u) -> Scalar:
        weight = self.a * self.k * t / (t + 1.0)
        return -(weight * x[0] * u[0] - u[0] ** 2)

    def terminal_cost(self, x) -> Scalar:
        del x
        return jnp.zeros(())
