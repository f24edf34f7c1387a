from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Scalar

from .._constants import param
from .._env import AbstractEnv


class DoublePendulum(AbstractEnv):
    """A chaotic frictionless double pendulum (Ma et al. 2024, arXiv §5.1).

    State (theta1, theta2, omega1, omega2): absolute angles from the downward
    vertical and angular velocities; s1 = 0. Only the first action matters: step 0
    places the system at rest with theta1 = pi a_0, theta2 = 0; each of the
    `horizon - 1` later steps is one solver step of length `dt = 0.02` of the
    equations of motion and ignores its action.

    The goal is the state reached after `horizon` steps from the action
    `target_action = -0.4` (see `goal`). The only reward is at the
    last step: minus the squared distance between the Cartesian positions of both
    bobs and those of the goal (so angle wrapping never matters). Its optimum is
    therefore exactly 0, and the norm of d x_H / d a_0 grows exponentially with H.
    """

    m1: Float[Array, ""] = param(1.0)
    m2: Float[Array, ""] = param(1.0)
    l1: Float[Array, ""] = param(1.0)
    l2: Float[Array, ""] = param(1.0)
    gravity: Float[Array, ""] = param(9.81)
    target_action: Float[Array, ""] = param(-0.4)

    name: ClassVar[str] = "double_pendulum"
    state_dim: ClassVar[int] = 4
    action_dim: ClassVar[int] = 1
    step_size: ClassVar[float] = 0.02

    @property
    def dt(self) -> float:
        return self.step_size

    def initial_state(self) -> Float[Array, " state"]:
        return jnp.zeros(4)

    def vector_field(self, t, x, args) -> Float[Array, " 4"]:
        """The frictionless double pendulum's equations of motion."""
        del t, args
        theta1, theta2, omega1, omega2 = x
        m1, m2, l1, l2, g = self.m1, self.m2, self.l1, self.l2, self.gravity
        delta = theta1 - theta2
        denominator = 2 * m1 + m2 - m2 * jnp.cos(2 * delta)
        alpha1 = (
            -g * (2 * m1 + m2) * jnp.sin(theta1)
            - m2 * g * jnp.sin(theta1 - 2 * theta2)
            - 2
            * jnp.sin(delta)
            * m2
            * (omega2**2 * l2 + omega1**2 * l1 * jnp.cos(delta))
        ) / (l1 * denominator)
        alpha2 = (
            2
            * jnp.sin(delta)
            * (
                omega1**2 * l1 * (m1 + m2)
                + g * (m1 + m2) * jnp.cos(theta1)
                + omega2**2 * l2 * m2 * jnp.cos(delta)
            )
        ) / (l2 * denominator)
        return jnp.stack([omega1, omega2, alpha1, alpha2])

    def positions(self, state: Float[Array, " 4"]) -> Float[Array, " 4"]:
        """The Cartesian positions (x1, y1, x2, y2) of both bobs."""
        theta1, theta2 = state[0], state[1]
        x1, y1 = self.l1 * jnp.sin(theta1), -self.l1 * jnp.cos(theta1)
        x2, y2 = x1 + self.l2 * jnp.sin(theta2), y1 - self.l2 * jnp.cos(theta2)
        return jnp.stack([x1, y1, x2, y2])

    def energy(self, state: Float[Array, " 4"]) -> Scalar:
        """The total mechanical energy, conserved by the exact dynamics."""
        theta1, theta2, omega1, omega2 = state
        m1, m2, l1, l2, g = self.m1, self.m2, self.l1, self.l2, self.gravity
        kinetic = 0.5 * (m1 + m2) * l1**2 * omega1**2 + 0.5 * m2 * l2**2 * omega2**2
        kinetic += m2 * l1 * l2 * omega1 * omega2 * jnp.cos(theta1 - theta2)
        potential = -(m1 + m2) * g * l1 * jnp.cos(theta1) - m2 * g * l2 * jnp.cos(
            theta2
        )
        return kinetic + potential

    def transition_and_reward(
        self, step: Int[Array, ""], state: Float[Array, " state"], action: Array
    ) -> tuple[Float[Array, " state"], Scalar]:
        action = jnp.clip(action, -1.0, 1.0)
        placed = jnp.zeros_like(state).at[0].set(jnp.pi * action[0])
        moved = self.ode_step(self.vector_field, step * self.dt, state, action)
        # No running reward: the return is the terminal reward alone.
        return jnp.where(step == 0, placed, moved), jnp.zeros(())

    def terminal_reward(self, final_state: Float[Array, " state"]) -> Scalar:
        difference = self.positions(final_state) - self.positions(self.goal())
        return -jnp.sum(difference**2)

    def reference_actions(self) -> Float[Array, "horizon action"]:
        return jnp.zeros((self.horizon, 1)).at[0, 0].set(self.target_action)

    def goal(self) -> Float[Array, " 4"]:
        """The state reached after `horizon` steps from `target_action`.

        Recomputed where it is used rather than stored, so that it follows the
        constants (under `vmap` over gravity, say). It does not depend on the
        actions, so under `vmap` over actions it is computed once, and it adds no
        path to the gradient with respect to the actions.
        """
        actions = self.reference_actions()
        return self.predict(self.initial_state(), actions)[-1]
