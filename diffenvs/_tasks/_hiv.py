from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._constants import param
from .._control import AbstractControlTask


class HIV(AbstractControlTask):
    """Drug therapy for HIV (Lenhart & Workman 2007, ch. 14).

    State: uninfected T cells T in [0, 1600], infected cells T_I in [0, 100], free
    virus V in [0, 100]. Control: u in [0, 1] multiplies infectivity (u = 1 is no
    therapy, u = 0 full therapy). The task maximises A T - (1 - u)^2; T = 20.

    Explicit Euler needs a horizon of about 50 or more to be stable. Returns are about
    800, of which only about 15 is controllable.
    """

    s: Float[Array, ""] = param(10.0)
    m1: Float[Array, ""] = param(0.02)
    m2: Float[Array, ""] = param(0.5)
    m3: Float[Array, ""] = param(4.4)
    r: Float[Array, ""] = param(0.03)
    t_max: Float[Array, ""] = param(1500.0)
    k: Float[Array, ""] = param(2.4e-5)
    n: Float[Array, ""] = param(300.0)
    a: Float[Array, ""] = param(0.05)

    name: ClassVar[str] = "hiv"
    state_dim: ClassVar[int] = 3
    action_dim: ClassVar[int] = 1
    duration: ClassVar[float] = 20.0
    x0: ClassVar[tuple[float, ...]] = (800.0, 0.04, 1.5)
    u_lo: ClassVar[tuple[float, ...]] = (0.0,)
    u_hi: ClassVar[tuple[float, ...]] = (1.0,)
    x_lo: ClassVar[tuple[float, ...] | None] = (0.0, 0.0, 0.0)
    x_hi: ClassVar[tuple[float, ...] | None] = (1600.0, 100.0, 100.0)

    def vector_field(self, t, x, u) -> Float[Array, " state"]:
        cells, infected, virus = x[0], x[1], x[2]
        infection = u[0] * self.k * cells * virus
        d_cells = (
            self.s / (1.0 + virus)
            - self.m1 * cells
            + self.r * cells * (1.0 - (cells + infected) / self.t_max)
            - infection
        )
        d_infected = infection - self.m2 * infected
        d_virus = self.n * self.m2 * infected - self.m3 * virus
        return jnp.stack([d_cells, d_infected, d_virus])

    def running_cost(self, t, x, u) -> Scalar:
        return -(self.a * x[0] - (1.0 - u[0]) ** 2)

    def terminal_cost(self, x) -> Scalar:
        del x
        return jnp.zeros(())
