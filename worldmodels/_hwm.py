"""History World Models: ŝ_{t+1} = h(ŝ_{1:t}, a_{1:t}) (arXiv §4, Fig. 1b)."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._backbones._backbone import Carry, dense
from ._learned import AbstractSequenceModel


class _HWMCarry(eqx.Module):
    backbone: Carry
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

    Built like every `AbstractSequenceModel` (see its arguments).
    """

    __init__ = AbstractSequenceModel.__init__

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
