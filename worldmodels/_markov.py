"""The Markov one-step model: ŝ_{t+1} = ŝ_t + f(ŝ_t, a_t) (arXiv §4)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._backbones._backbone import check_positive
from ._learned import AbstractLearnedModel
from ._normaliser import Normaliser
from ._rollout import rollout


class _MarkovCarry(eqx.Module):
    z: Array
    step: Int[Array, ""]


class Markov(AbstractLearnedModel):
    """A one-step model: z_{t+1} = z_t + f(z_t, a_t, t / horizon), f an MLP
    (the papers' default: 2 hidden layers of 64, ReLU), on normalised states.

    Trained on one-step targets (`teacher_forced`); `predict` unrolls it on its
    own predictions.

    Args:
        state_dim: size of a state.
        action_dim: size of an action.
        horizon: the longest action sequence the model accepts.
        hidden_size: width of each hidden layer.
        depth: number of hidden layers.
        key: PRNG key for the initial weights.
        normaliser: the state normalisation; `worldmodels.fit` fits it from data.
    """

    mlp: eqx.nn.MLP
    normaliser: Normaliser
    state_dim: int = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)
    horizon: int = eqx.field(static=True)

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        horizon: int,
        hidden_size: int = 64,
        depth: int = 2,
        *,
        key: PRNGKeyArray,
        normaliser: Normaliser | None = None,
    ):
        check_positive(hidden_size=hidden_size, depth=depth)
        self.mlp = eqx.nn.MLP(
            state_dim + action_dim + 1,
            state_dim,
            hidden_size,
            depth,
            activation=jax.nn.relu,
            key=key,
        )
        self.normaliser = normaliser or Normaliser.identity(state_dim)
        self.state_dim = state_dim
        self.action_dim = action_dim
        self.horizon = horizon

    def _next(self, z: Array, action: Array, step: Array) -> Array:
        time = self._time_at(step, z.dtype)
        return z + self.mlp(jnp.concatenate([z, action, time]))

    def predict(
        self, s1: Float[Array, " state"], actions: Float[Array, "horizon action"]
    ) -> Float[Array, "horizon state"]:
        """The step-by-step rollout, each prediction fed back as the next input."""
        return rollout(self, s1, self._check_actions(actions))

    def teacher_forced(
        self,
        s1: Float[Array, " state"],
        actions: Float[Array, "horizon action"],
        states: Float[Array, "horizon state"],
    ) -> Float[Array, "horizon state"]:
        actions, z = self._previous_states(s1, actions, states)
        steps = jnp.arange(actions.shape[0])
        return self.normaliser.denormalise(jax.vmap(self._next)(z, actions, steps))

    def init(self, s1: Float[Array, " state"], horizon: int) -> _MarkovCarry:
        return _MarkovCarry(self._initial(s1, horizon), jnp.zeros((), jnp.int32))

    def step(self, carry: _MarkovCarry, action: Float[Array, " action"]):
        z = self._next(carry.z, self._check_action(action, carry.step), carry.step)
        return _MarkovCarry(z, carry.step + 1), self.normaliser.denormalise(z)
