"""The common semantics of the eight optimal-control tasks (Lenhart & Workman 2007)."""

from __future__ import annotations

import abc
from typing import ClassVar

import diffrax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Scalar

from ._env import AbstractEnv


class AbstractControlTask(AbstractEnv):
    """A task x' = f(x, u, t), running cost g(x, u, t), optional terminal cost g_T.

    * The duration T is fixed; the step is dt = T / horizon.
    * The action a in `[-1, 1]^m` maps affinely onto the control box:
      u = u_lo + (a + 1) / 2 * (u_hi - u_lo).
    * x_{k+1} = clip(x_k + dt f(x_k, u_k, t_k), x_lo, x_hi) with Euler, t_k = k dt.
      Another explicit Diffrax solver replaces the increment; where one of its
      stages falls outside the box, f is evaluated at the nearest point of the box.
    * r_k = -g(x_k, u_k, t_k) dt, and the last step also gets -g_T(x_H).
    """

    duration: ClassVar[float]
    x0: ClassVar[tuple[float, ...]]
    u_lo: ClassVar[tuple[float, ...]]
    u_hi: ClassVar[tuple[float, ...]]
    # Per-dimension state bounds; None where a task has no bound at all.
    x_lo: ClassVar[tuple[float, ...] | None] = None
    x_hi: ClassVar[tuple[float, ...] | None] = None
    # x_{k+1} = clip(x_k + increment): a NaN in x_k stays NaN (the sum and the clip
    # propagate it), and an infinite x_k stays infinite or turns NaN where it is
    # unbounded, so a non-finite state anywhere shows in the final state. (Where a
    # bound clips an overflow back to a finite value, no step's result was
    # non-finite in the first place.) It holds for this class's own step, which
    # `__init_subclass__` keeps.
    _nonfinite_persists: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = sorted(set(_STEP_METHODS) & set(vars(cls)))
        if own:
            raise TypeError(
                f"{cls.__name__} defines {', '.join(own)}: a control task gives its "
                f"dynamics as vector_field, running_cost and terminal_cost, and the "
                f"step is AbstractControlTask's. For a step of your own, subclass "
                f"diffenvs.AbstractEnv and define transition_and_reward."
            )

    @abc.abstractmethod
    def vector_field(
        self, t: Scalar, x: Float[Array, " state"], u: Float[Array, " action"]
    ) -> Float[Array, " state"]:
        """The dynamics f(x, u, t) in the task's own units."""

    @abc.abstractmethod
    def running_cost(
        self, t: Scalar, x: Float[Array, " state"], u: Float[Array, " action"]
    ) -> Scalar:
        """The running cost g(x, u, t); the reward is -g dt."""

    @abc.abstractmethod
    def terminal_cost(self, x: Float[Array, " state"]) -> Scalar:
        """The terminal cost g_T(x_H) (zero for a task without one)."""

    @property
    def dt(self) -> float:
        return self.duration / self.horizon

    def initial_state(self) -> Float[Array, " state"]:
        return jnp.asarray(self.x0, dtype=float)

    def control(self, action: Float[Array, " action"]) -> Float[Array, " action"]:
        """The control u for an action a in `[-1, 1]` (the affine map onto the box)."""
        lo = jnp.asarray(self.u_lo, action.dtype)
        hi = jnp.asarray(self.u_hi, action.dtype)
        return lo + (action + 1.0) * 0.5 * (hi - lo)

    def transition_and_reward(
        self, step: Int[Array, ""], state: Float[Array, " state"], action: Array
    ) -> tuple[Float[Array, " state"], Scalar]:
        # One control for both: computed twice, XLA on CPU does not merge the two,
        # and the gradient through the time loop is much slower.
        u = self._control_of(action)
        return self._advance(step, state, u), self._reward(step, state, u)

    def _control_of(self, action: Array) -> Array:
        return self.control(jnp.clip(action, -1.0, 1.0))

    def _advance(self, step: Int[Array, ""], state: Array, u: Array) -> Array:
        vector_field = self.vector_field
        if not isinstance(self.solver, diffrax.Euler) and (
            self.x_lo is not None or self.x_hi is not None
        ):
            # A multi-stage solver evaluates f at points between x_k and x_{k+1},
            # which may leave the box where the task is defined (bacteria's
            # e^{-x} at x = -1000 overflows, and its gradient turns NaN). Evaluate
            # f at the nearest point of the box there. Euler only evaluates f at
            # x_k, which is in the box already.
            vector_field = _boxed(self.vector_field, self.x_lo, self.x_hi)
        next_state = self.ode_step(vector_field, step * self.dt, state, u)
        if self.x_lo is not None:
            next_state = jnp.maximum(next_state, jnp.asarray(self.x_lo, state.dtype))
        if self.x_hi is not None:
            next_state = jnp.minimum(next_state, jnp.asarray(self.x_hi, state.dtype))
        return next_state

    def _reward(self, step: Int[Array, ""], state: Array, u: Array) -> Scalar:
        return -self.running_cost(step * self.dt, state, u) * self.dt

    def terminal_reward(self, final_state: Float[Array, " state"]) -> Scalar:
        return -self.terminal_cost(final_state)

    def reference_actions(self) -> None:
        return None


# The methods that make up a control task's step.
_STEP_METHODS = (
    "transition",
    "running_reward",
    "transition_and_reward",
    "_advance",
    "_reward",
    "_control_of",
)


def _boxed(vector_field, x_lo, x_hi):
    def boxed(t, x, u):
        # `where`, not `clip`: inside the box, the bound included, the derivative
        # with respect to x stays exactly 1 (`clip` halves it at a tie).
        if x_lo is not None:
            lo = jnp.asarray(x_lo, x.dtype)
            x = jnp.where(x < lo, lo, x)
        if x_hi is not None:
            hi = jnp.asarray(x_hi, x.dtype)
            x = jnp.where(x > hi, hi, x)
        return vector_field(t, x, u)

    return boxed
