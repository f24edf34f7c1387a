"""The Diffrax step: one solver step of an ODE whose control is held constant."""

from __future__ import annotations

from collections.abc import Callable

import diffrax
from jaxtyping import Array, Float


def check_solver(solver: object) -> None:
    """Raise unless `solver` is an explicit Diffrax solver of a single ODE term,
    the kind that `ode_step` can take one fixed step with."""
    if not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(
            f"solver must be a Diffrax solver instance such as diffrax.Euler(), got "
            f"{solver!r}."
        )
    if isinstance(solver, diffrax.AbstractImplicitSolver):
        raise ValueError(
            f"solver must be an explicit fixed-step Diffrax solver (Euler, Heun, "
            f"Midpoint, Ralston, Bosh3, Tsit5, Dopri5, ...), got the implicit solver "
            f"{type(solver).__name__}."
        )
    if solver.term_structure is not diffrax.AbstractTerm:
        raise ValueError(
            f"solver must integrate a single ODE term, got {type(solver).__name__} "
            f"whose term structure is {solver.term_structure!r}."
        )


def ode_step(
    solver: diffrax.AbstractSolver,
    vector_field: Callable[..., Array],
    t0: Float[Array, ""],
    t1: Float[Array, ""],
    y0: Float[Array, " state"],
    args: Array,
) -> Float[Array, " state"]:
    """One step of `solver` from `t0` to `t1` of `dy/dt = vector_field(t, y, args)`.

    We call the solver's `step` directly instead of `diffrax.diffeqsolve`: the
    control changes at every step, so each step is its own initial-value problem,
    and `diffeqsolve`'s adaptive loop and output handling would cost far more than
    the single step itself. The solver state is initialised afresh at every step
    because a first-same-as-last derivative cached from the previous step belongs to
    the previous control.
    """
    term = diffrax.ODETerm(vector_field)
    solver_state = solver.init(term, t0, t1, y0, args)
    y1, _, _, _, _ = solver.step(term, t0, t1, y0, args, solver_state, made_jump=False)
    return y1
