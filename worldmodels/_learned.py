"""What the built-in learned models share: sizes, normalisation, input checks."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._model import AbstractWorldModel
from ._normaliser import Normaliser


class AbstractLearnedModel(AbstractWorldModel):
    """A learned world model for states of size `state_dim` and actions of size
    `action_dim`, over sequences of at most `horizon` steps.

    It works on normalised states z = `normaliser.normalise(s)` and takes the
    normalised time t / horizon as an input at every step (the tasks have a
    finite horizon, so the dynamics of a model may depend on time). A shorter
    sequence than `horizon` is allowed: by causality its predictions are the
    first rows of the full-length ones.
    """

    state_dim: eqx.AbstractVar[int]
    action_dim: eqx.AbstractVar[int]
    horizon: eqx.AbstractVar[int]
    normaliser: eqx.AbstractVar[Normaliser]

    def teacher_forced(
        self,
        s1: Float[Array, " state"],
        actions: Float[Array, "horizon action"],
        states: Float[Array, "horizon state"],
    ) -> Float[Array, "horizon state"]:
        """The predictions when every state the model reads is the true one. A
        model that reads no predicted state (an AWM) predicts the same either way."""
        del states
        return self.predict(s1, actions)

    def _time(self, length: int) -> Float[Array, "time 1"]:
        # The same arithmetic as the steps' step.astype(dtype) / horizon, so that the
        # parallel and the step-by-step forms see identical inputs.
        return (jnp.arange(length).astype(float) / self.horizon)[:, None]

    def _check_state(self, s1: Array) -> Array:
        s1 = jnp.asarray(s1)
        if s1.shape != (self.state_dim,):
            raise ValueError(
                f"s1 must have shape (state_dim,) = ({self.state_dim},) for this "
                f"{type(self).__name__}, got shape {s1.shape}; was the model built "
                f"for another task?"
            )
        return s1

    def _check_action(self, action: Array) -> Array:
        action = jnp.asarray(action)
        if action.shape != (self.action_dim,):
            raise ValueError(
                f"action must have shape (action_dim,) = ({self.action_dim},) for "
                f"this {type(self).__name__}, got shape {action.shape}."
            )
        return action

    def _check_actions(self, actions: Array) -> Array:
        actions = jnp.asarray(actions)
        if actions.ndim != 2 or actions.shape[1] != self.action_dim:
            raise ValueError(
                f"actions must have shape (horizon, action_dim) with action_dim="
                f"{self.action_dim} for this {type(self).__name__}, got shape "
                f"{actions.shape}; batch with jax.vmap, and check that the model "
                f"was built for this task."
            )
        self._check_horizon(actions.shape[0])
        return eqx.error_if(
            actions, jnp.any(jnp.isnan(actions)), "worldmodels: actions contain NaN."
        )

    def _check_states(self, states: Array, length: int) -> Array:
        states = jnp.asarray(states)
        if states.shape != (length, self.state_dim):
            raise ValueError(
                f"states must have shape (horizon, state_dim) = "
                f"{(length, self.state_dim)}, got shape {states.shape}."
            )
        return states

    def _check_horizon(self, horizon: int) -> None:
        if horizon > self.horizon:
            raise ValueError(
                f"this {type(self).__name__} was built for sequences of at most "
                f"horizon={self.horizon} steps, got {horizon}; build it with a "
                f"longer horizon."
            )
