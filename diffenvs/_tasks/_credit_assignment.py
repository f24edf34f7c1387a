from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Scalar

from .._constants import param
from .._env import AbstractEnv


class CreditAssignment(AbstractEnv):
    """The copy task for long-term credit assignment (Ma et al. 2024, ICLR §4.1 and
    App. F.1).

    State (s1, s2), one action in [-1, 1] used as is. s1 = 0 throughout (the paper's
    sigma = 0); s2 = 0 initially, the first step copies the action into it and later
    steps keep it. Rewards: -(s1 - a_k)^2 / H at every step 0 < k < H - 1, and at the
    last step -20 (s2_H - 0.5)^2 + 10. The optimum, a_0 = 0.5 and a_k = 0 after,
    returns exactly 10.

    This task is a discrete map with no continuous dynamics, so the Diffrax solver
    plays no part in it; `dt = 1 / horizon` is the time grid the observations use.
    """

    target: Float[Array, ""] = param(0.5)
    final_weight: Float[Array, ""] = param(20.0)
    bonus: Float[Array, ""] = param(10.0)

    name: ClassVar[str] = "credit_assignment"
    state_dim: ClassVar[int] = 2
    action_dim: ClassVar[int] = 1

    @property
    def dt(self) -> float:
        return 1.0 / self.horizon

    def initial_state(self) -> Float[Array, " state"]:
        return jnp.zeros(2)

    def transition_and_reward(
        self, step: Int[Array, ""], state: Float[Array, " state"], action: Array
    ) -> tuple[Float[Array, " state"], Scalar]:
        action = jnp.clip(action, -1.0, 1.0)
        copied = state.at[1].set(action[0])
        penalised = (step > 0) & (step < self.horizon - 1)
        penalty = (state[0] - action[0]) ** 2 / self.horizon
        return jnp.where(step == 0, copied, state), jnp.where(penalised, -penalty, 0.0)

    def terminal_reward(self, final_state: Float[Array, " state"]) -> Scalar:
        return -self.final_weight * (final_state[1] - self.target) ** 2 + self.bonus

    def reference_actions(self) -> Float[Array, "horizon action"]:
        return jnp.zeros((self.horizon, 1)).at[0, 0].set(self.target)
