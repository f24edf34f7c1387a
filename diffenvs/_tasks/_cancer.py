from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._constants import param
from .._control import AbstractControlTask


class Cancer(AbstractControlTask):
    """Chemotherapy against a tumour (Lenhart & Workman 2007, ch. 10).

    State: normalised tumour density x in [1e-3, 1]. Control: drug strength u in
    [0, 2]. x' = r x ln(1/x) - delta u x; cost g = a x^2 + u^2; T = 20.
    """

    r: Float[Array, ""] = param(0.3)
    delta: Float[Array, ""] = param(0.45)
    a: Float[Array, ""] = param(3.0)

    name: ClassVar[str] = "cancer"
    state_dim: ClassVar[int] = 1
    action_dim: ClassVar[int] = 1
    duration: ClassVar[float] = 20.0
    x0: ClassVar[tuple[float, ...]] = (0.975,)
    u_lo: ClassVar[tuple[float, ...]] = (0.0,)
    u_hi: ClassVar[tuple[float, ...]] = (2.0,)
    x_lo: ClassVar[tuple[float, ...] | None] = (1e-3,)
    x_hi: ClassVar[tuple[float, ...] | None] = (1.0,)

    def vector_field(self, t, x, u) -> Float[Array, " state"]:
        return self.r * x * jnp.log(1.0 / x) - self.delta * u * x

    def running_cost(self, t, x, u) -> Scalar:
        return self.a * x[0] ** 2 + u[0] ** 2

    def terminal_cost(self, x) -> Scalar:
        del x
        return jnp.zeros(())
