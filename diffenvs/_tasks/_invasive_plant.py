from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._constants import param
from .._control import AbstractControlTask


class InvasivePlant(AbstractControlTask):
    """Removing five foci of an invasive plant (Lenhart & Workman 2007, ch. 24), as a
    continuous-time ODE.

    State: radii x_j of the five foci (unbounded). Control: fraction removed u_j in
    [0, 1]. x_j' = k x_j / (eps + x_j) (1 - u_j) - u_j x_j; running cost
    g = B sum_j u_j^2; terminal cost g_T = sum_j x_{H,j}; T = 10.

    Myriad's original is a ten-step discrete map; at horizon 10 this ODE's Euler map
    coincides with it. Stiff near x_j = 0, where the growth slope is k / eps = 100.
    """

    k: Float[Array, ""] = param(1.0)
    eps: Float[Array, ""] = param(0.01)
    b: Float[Array, ""] = param(1.0)

    name: ClassVar[str] = "invasive_plant"
    state_dim: ClassVar[int] = 5
    action_dim: ClassVar[int] = 5
    duration: ClassVar[float] = 10.0
    x0: ClassVar[tuple[float, ...]] = (0.5, 1.0, 1.5, 2.0, 10.0)
    u_lo: ClassVar[tuple[float, ...]] = (0.0,) * 5
    u_hi: ClassVar[tuple[float, ...]] = (1.0,) * 5

    def vector_field(self, t, x, u) -> Float[Array, " state"]:
        return self.k * x / (self.eps + x) * (1.0 - u) - u * x

    def running_cost(self, t, x, u) -> Scalar:
        return self.b * jnp.sum(u**2)

    def terminal_cost(self, x) -> Scalar:
        return jnp.sum(x)
