"""What the built-in learned models share: sizes, normalisation, input checks,
and the embedding-backbone-head layout of the sequence models."""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from diffenvs import branched_error_if, error_if

from ._backbones._backbone import AbstractBackbone
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

    A subclass implements `predict`, `init` and `step`, and, when it reads
    predicted states (`HWM`, `Markov`), `teacher_forced` for training.
    """

    state_dim: eqx.AbstractVar[int]
    action_dim: eqx.AbstractVar[int]
    horizon: eqx.AbstractVar[int]
    normaliser: eqx.AbstractVar[Normaliser]

    @abc.abstractmethod
    def init(self, s1: Float[Array, " state"], horizon: int) -> PyTree:
        """The carry before the first step of a sequence of at most `horizon`
        steps from `s1`."""

    @abc.abstractmethod
    def step(
        self, carry: PyTree, action: Float[Array, " action"]
    ) -> tuple[PyTree, Float[Array, " state"]]:
        """One step: the new carry and the predicted state after `action`."""

    def _previous_states(
        self, s1: Array, actions: Array, states: Array
    ) -> tuple[Array, Array]:
        """Checked `actions` and the normalised true states z_1 ... z_H that precede
        each action, for a teacher-forced prediction."""
        s1, actions = self._check_state(s1), self._check_actions(actions)
        states = self._check_states(states, actions.shape[0])
        z = self.normaliser.normalise(jnp.concatenate([s1[None], states[:-1]]))
        return actions, z

    def _time(self, length: int) -> Float[Array, "time 1"]:
        # The same arithmetic as `_time_at`, so that the parallel and the
        # step-by-step forms see identical inputs.
        return (jnp.arange(length).astype(float) / self.horizon)[:, None]

    def _time_at(self, step: Array, dtype) -> Float[Array, " 1"]:
        """The time input t / H of one step, shape `(1,)`."""
        return (step.astype(dtype) / self.horizon)[None]

    def _initial(self, s1: Array, horizon: int) -> Array:
        """The normalised initial state z_1, for `init` of a generation of
        `horizon` steps (both checked)."""
        self._check_horizon(horizon)
        return self.normaliser.normalise(self._check_state(s1))

    def _check_state(self, s1: Array) -> Array:
        s1 = jnp.asarray(s1)
        if s1.shape != (self.state_dim,):
            raise ValueError(
                f"s1 must have shape (state_dim,) = ({self.state_dim},) for this "
                f"{type(self).__name__}, got shape {s1.shape}; was the model built "
                f"for another task?"
            )
        # The check runs in derivatives too (`diffenvs.error_if`).
        return error_if(
            s1, ~jnp.all(jnp.isfinite(s1)), "worldmodels: s1 is not finite."
        )

    def _check_action(self, action: Array, step: Array | None = None) -> Array:
        action = jnp.asarray(action)
        if action.shape != (self.action_dim,):
            raise ValueError(
                f"action must have shape (action_dim,) = ({self.action_dim},) for "
                f"this {type(self).__name__}, got shape {action.shape}."
            )
        if step is None:
            return jnp.clip(action, -1.0, 1.0)
        # A step past the horizon would read time features and cache rows that
        # do not exist; the checks run in derivatives too (`diffenvs.error_if`).
        nan = jnp.any(jnp.isnan(action))
        action = branched_error_if(
            action,
            nan | (step >= self.horizon),
            jnp.where(nan, 1, 0),
            (
                f"worldmodels: step called past the horizon={self.horizon} this "
                f"{type(self).__name__} was built for.",
                "worldmodels: action contains NaN.",
            ),
        )
        return jnp.clip(action, -1.0, 1.0)

    def _check_actions(self, actions: Array) -> Array:
        actions = jnp.asarray(actions)
        if actions.ndim != 2 or actions.shape[1] != self.action_dim:
            raise ValueError(
                f"actions must have shape (horizon, action_dim) with action_dim="
                f"{self.action_dim} for this {type(self).__name__}, got shape "
                f"{actions.shape}; batch with jax.vmap, and check that the model "
                f"was built for this task."
            )
        if actions.shape[0] == 0:
            raise ValueError(
                f"actions must hold at least one step, got shape {actions.shape}."
            )
        self._check_horizon(actions.shape[0])
        # The check runs in derivatives too (`diffenvs.error_if`). Actions are
        # clipped to [-1, 1] as every task clips them.
        actions = error_if(
            actions, jnp.any(jnp.isnan(actions)), "worldmodels: actions contain NaN."
        )
        return jnp.clip(actions, -1.0, 1.0)

    def _check_states(self, states: Array, length: int) -> Array:
        states = jnp.asarray(states)
        if states.shape != (length, self.state_dim):
            raise ValueError(
                f"states must have shape (horizon, state_dim) = "
                f"{(length, self.state_dim)}, got shape {states.shape}."
            )
        return states

    def _check_horizon(self, horizon: int) -> None:
        if isinstance(horizon, bool) or not isinstance(horizon, int | np.integer):
            raise TypeError(f"horizon must be an int, got {horizon!r}.")
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got horizon={horizon}.")
        if horizon > self.horizon:
            raise ValueError(
                f"this {type(self).__name__} was built for sequences of at most "
                f"horizon={self.horizon} steps, got {horizon}; build it with a "
                f"longer horizon."
            )


class AbstractSequenceModel(AbstractLearnedModel):
    """A linear embedding of each input row `[state or s1, action, time]`, a causal
    backbone over the rows, and a linear head that reads the normalised state
    (`AWM`, `HWM`; built by `sequence_layers`)."""

    embedding: eqx.AbstractVar[eqx.nn.Linear]
    backbone: eqx.AbstractVar[AbstractBackbone]
    head: eqx.AbstractVar[eqx.nn.Linear]


def sequence_layers(
    state_dim: int, action_dim: int, backbone: AbstractBackbone, key: PRNGKeyArray
) -> tuple[eqx.nn.Linear, eqx.nn.Linear]:
    """The embedding of the input rows into `backbone` and the head that reads the
    state from its output rows."""
    embedding_key, head_key = jr.split(key)
    in_size = state_dim + action_dim + 1
    embedding = eqx.nn.Linear(in_size, backbone.in_size, key=embedding_key)
    head = eqx.nn.Linear(backbone.out_size, state_dim, key=head_key)
    return embedding, head
