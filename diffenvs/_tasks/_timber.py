from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._constants import param
from .._control import AbstractControlTask


class Timber(AbstractControlTask):
    """Reinvesting timber revenue (Lenhart & Workman 2007, ch. 18).

    State: production rate x in [0, 20000]. Control: fraction reinvested u in [0, 1].
    x' = k x u; the task maximises e^{-r t} x (1 - u), so g = -e^{-r t} x (1 - u);
    T = 5. The optimum is bang-bang (reinvest until t = 4, then harvest); the Euler
    optimum at horizon H is max_n (H - n) dt x0 (1 + k dt)^n.
    """

    k: Float[Array, ""] = param(1.0)
    discount: Float[Array, ""] = param(0.0)

    name: ClassVar[str] = "timber"
    state_dim: ClassVar[int] = 1
    action_dim: ClassVar[int] = 1
    duration: ClassVar[float] = 5.0
    x0: ClassVar[tuple[float, ...]] = (100.0,)
    u_lo: ClassVar[tuple[float, ...]] = (0.0,)
    u_hi: ClassVar[tuple[float, ...]] = (1.0,)
    x_lo: ClassVar[tuple[float, ...] | None] = (0.0,)
    x_hi: ClassVar[tuple[float, ...] | None] = (20000.0,)

    def vector_field(self, t, x, u) -> Float[Array, " state"]:
        return self.k * x * u

    def running_cost(self, t, x, u) -> Scalar:
        return -jnp.exp(-self.discount * t) * x[0] * (1.0 - u[0])

    def terminal_cost(self, x) -> Scalar:
        del x
        return jnp.zeros(())
