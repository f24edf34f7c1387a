"""History World Models: ŝ_{t+1} = h(ŝ_{1:t}, a_{1:t}) (arXiv §4, Fig. 1b)."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._backbones._backbone import AbstractBackbone, dense
from ._learned import AbstractSequenceModel, sequence_layers
from ._normaliser import Normaliser
from ._rollout import rollout


class _HWMCarry(eqx.Module):
    backbone: PyTree
    z: Array
    step: Int[Array, ""]


class HWM(AbstractSequenceModel):
    """A History World Model: the state after action t is a function of the
    states so far and the actions so far.

    Input row t is `[z_t, a_t, t / horizon]` (z_t the normalised state t, z_1
    from s1), embedded by a linear layer; the causal backbone reads the rows so
    far; a linear head gives z_{t+1} as an offset from z_t.

    Trained teacher-forced (`teacher_forced`: every z_t is the true state, all
    rows in parallel), while `predict` feeds its own predictions back in, one step
    at a time. That feedback makes gradients flow through the chain of predicted
    states, which can grow exponentially with the horizon (Thm. 1).

    Args:
        state_dim: size of a state.
        action_dim: size of an action.
        horizon: the longest action sequence the model accepts.
        backbone: a causal backbone whose `in_size` is the embedding width, e.g.
            `worldmodels.Transformer(horizon, key=...)` or
            `worldmodels.LSTM(72, key=...)`.
        key: PRNG key for the embedding and the head.
        normaliser: the state normalisation; `worldmodels.fit` fits it from data.
    """

    embedding: eqx.nn.Linear
    backbone: AbstractBackbone
    head: eqx.nn.Linear
    normaliser: Normaliser
    state_dim: int = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)
    horizon: int = eqx.field(static=True)

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        horizon: int,
        backbone: AbstractBackbone,
        *,
        key: PRNGKeyArray,
        normaliser: Normaliser | None = None,
    ):
        self.embedding, self.head = sequence_layers(
            state_dim, action_dim, backbone, key
        )
        self.backbone = backbone
        self.normaliser = normaliser or Normaliser.identity(state_dim)
        self.state_dim = state_dim
        self.action_dim = action_dim
        self.horizon = horizon

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
        inputs = jnp.concatenate([z, actions, self._time(actions.shape[0])], axis=1)
        y = self.backbone(dense(self.embedding, inputs))
        return self.normaliser.denormalise(z + dense(self.head, y))

    def init(self, s1: Float[Array, " state"], horizon: int) -> _HWMCarry:
        z1 = self._initial(s1, horizon)
        return _HWMCarry(self.backbone.init(horizon), z1, jnp.zeros((), jnp.int32))

    def step(self, carry: _HWMCarry, action: Float[Array, " action"]):
        action = self._check_action(action, carry.step)
        time = self._time_at(carry.step, carry.z.dtype)
        x = self.embedding(jnp.concatenate([carry.z, action, time]))
        backbone, y = self.backbone.step(carry.backbone, x)
        z = carry.z + self.head(y)
        return _HWMCarry(backbone, z, carry.step + 1), self.normaliser.denormalise(z)
