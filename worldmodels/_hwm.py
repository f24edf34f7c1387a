"""History World Models: ŝ_{t+1} = h(ŝ_{1:t}, a_{1:t}) (arXiv §4, Fig. 1b)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._backbones._backbone import AbstractBackbone, Carry, dense
from ._learned import AbstractLearnedModel
from ._normaliser import Normaliser


class _HWMCarry(eqx.Module):
    backbone: Carry
    z: Array
    step: Int[Array, ""]


class HWM(AbstractLearnedModel):
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
        backbone: a causal backbone whose `in_size` is the embedding width.
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
        embedding_key, head_key = jr.split(key)
        in_size = state_dim + action_dim + 1
        self.embedding = eqx.nn.Linear(in_size, backbone.in_size, key=embedding_key)
        self.backbone = backbone
        self.head = eqx.nn.Linear(backbone.out_size, state_dim, key=head_key)
        self.normaliser = normaliser or Normaliser.identity(state_dim)
        self.state_dim = state_dim
        self.action_dim = action_dim
        self.horizon = horizon

    def predict(
        self, s1: Float[Array, " state"], actions: Float[Array, "horizon action"]
    ) -> Float[Array, "horizon state"]:
        actions = self._check_actions(actions)
        _, states = jax.lax.scan(
            lambda carry, action: self.step(carry, action),
            self.init(s1, actions.shape[0]),
            actions,
        )
        return states

    def teacher_forced(
        self,
        s1: Float[Array, " state"],
        actions: Float[Array, "horizon action"],
        states: Float[Array, "horizon state"],
    ) -> Float[Array, "horizon state"]:
        s1, actions = self._check_state(s1), self._check_actions(actions)
        states = self._check_states(states, actions.shape[0])
        z = self.normaliser.normalise(jnp.concatenate([s1[None], states[:-1]]))
        inputs = jnp.concatenate([z, actions, self._time(actions.shape[0])], axis=1)
        y = self.backbone(dense(self.embedding, inputs))
        return self.normaliser.denormalise(z + dense(self.head, y))

    def init(self, s1: Float[Array, " state"], horizon: int) -> _HWMCarry:
        self._check_horizon(horizon)
        z1 = self.normaliser.normalise(self._check_state(s1))
        return _HWMCarry(self.backbone.init(horizon), z1, jnp.zeros((), jnp.int32))

    def step(self, carry: _HWMCarry, action: Float[Array, " action"]):
        action = self._check_action(action)
        time = carry.step.astype(carry.z.dtype) / self.horizon
        x = self.embedding(jnp.concatenate([carry.z, action, time[None]]))
        backbone, y = self.backbone.step(carry.backbone, x)
        z = carry.z + self.head(y)
        return _HWMCarry(backbone, z, carry.step + 1), self.normaliser.denormalise(z)
