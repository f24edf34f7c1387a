"""Actions World Models: ŝ_{t+1} = g(s1, a_{1:t}) (arXiv §4, Fig. 1c)."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._backbones._backbone import AbstractBackbone, dense
from ._learned import AbstractSequenceModel, sequence_layers
from ._normaliser import Normaliser


class _AWMCarry(eqx.Module):
    backbone: PyTree
    z1: Array
    step: Int[Array, ""]


class AWM(AbstractSequenceModel):
    """An Actions World Model: the state after action t is a function of s1 and
    the actions a_1 ... a_t only, never of a predicted state.

    Input row t is `[a_t, z1, t / horizon]` (z1 the normalised initial state),
    embedded by a linear layer; the backbone is causal over the rows; a linear
    head reads the normalised state as an offset from z1. The gradient of a
    predicted state with respect to an action therefore stays inside the backbone
    (Thm. 2): for a transformer it is polynomial in the horizon, for an RNN
    possibly exponential.

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
        s1, actions = self._check_state(s1), self._check_actions(actions)
        length = actions.shape[0]
        z1 = self.normaliser.normalise(s1)
        inputs = jnp.concatenate(
            [
                actions,
                jnp.broadcast_to(z1, (length, self.state_dim)),
                self._time(length),
            ],
            axis=1,
        )
        x = dense(self.embedding, inputs)
        y = self.backbone(x)
        z = z1 + dense(self.head, y)
        return self.normaliser.denormalise(z)

    def init(self, s1: Float[Array, " state"], horizon: int) -> _AWMCarry:
        z1 = self._initial(s1, horizon)
        return _AWMCarry(self.backbone.init(horizon), z1, jnp.zeros((), jnp.int32))

    def step(self, carry: _AWMCarry, action: Float[Array, " action"]):
        action = self._check_action(action, carry.step)
        time = self._time_at(carry.step, carry.z1.dtype)
        x = self.embedding(jnp.concatenate([action, carry.z1, time]))
        backbone, y = self.backbone.step(carry.backbone, x)
        z = carry.z1 + self.head(y)
        return _AWMCarry(
            backbone, carry.z1, carry.step + 1
        ), self.normaliser.denormalise(z)
