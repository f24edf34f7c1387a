from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Scalar

from .._constants import param
from .._env import AbstractEnv


class OneBounce(AbstractEnv):
    """A block pushed once towards a wall, with one elastic bounce (Ma et al. 2024,
    arXiv §5.1).

    State (x, v): position and velocity on a line with a wall at x = 1; s1 = 0;
    duration 1, so dt = 1 / horizon. Step 0 first applies the push v = 1.5 + a_0
    (v in [0.5, 2.5]); then every step, step 0 included, moves x by dt v with the
    solver and, if x > 1, reflects: x = 2 - x, v = -v. Later actions are ignored.
    The only reward is at the last step, -(x_H - goal)^2 with goal 0.25. The final
    position is 2 - v past the wall and v otherwise, so the optimum is a_0 = 0.25,
    and the return has a kink at a_0 = -0.5.
    """

    push: Float[Array, ""] = param(1.5)
    wall: Float[Array, ""] = param(1.0)
    goal: Float[Array, ""] = param(0.25)

    name: ClassVar[str] = "one_bounce"
    state_dim: ClassVar[int] = 2
    action_dim: ClassVar[int] = 1

    @property
    def dt(self) -> float:
        return 1.0 / self.horizon

    def initial_state(self) -> Float[Array, " state"]:
        return jnp.zeros(2)

    def vector_field(self, t, state, args) -> Float[Array, " 2"]:
        del t, args
        return jnp.stack([state[1], jnp.zeros_like(state[1])])

    def transition_and_reward(
        self, step: Int[Array, ""], state: Float[Array, " state"], action: Array
    ) -> tuple[Float[Array, " state"], Scalar]:
        action = jnp.clip(action, -1.0, 1.0)
        velocity = jnp.where(step == 0, self.push + action[0], state[1])
        state = jnp.stack([state[0], velocity])
        state = self.ode_step(self.vector_field, step * self.dt, state, action)
        position, velocity = state[0], state[1]
        bounced = position > self.wall
        position = jnp.where(bounced, 2 * self.wall - position, position)
        velocity = jnp.where(bounced, -velocity, velocity)
        # No running reward: the return is the terminal reward alone.
        return jnp.stack([position, velocity]), jnp.zeros(())

    def terminal_reward(self, final_state: Float[Array, " state"]) -> Scalar:
        return -((final_state[0] - self.goal) ** 2)

    def reference_actions(self) -> Float[Array, "horizon action"]:
        optimum = self.goal - self.push
        return jnp.zeros((self.horizon, 1)).at[0, 0].set(optimum)
