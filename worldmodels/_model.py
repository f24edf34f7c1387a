"""The world-model protocol and its incremental (step-by-step) form."""

from __future__ import annotations

import abc
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree

import diffenvs

from ._rollout import rollout


class AbstractWorldModel(eqx.Module):
    """A model of a task's dynamics: `predict(s1, actions) -> states`.

    `predict` is the one required method. Row t of the result is the state that
    follows action t, so `states[t]` may depend on `s1` and `actions[: t + 1]` only
    (causality). Every `diffenvs` task satisfies the same protocol.

    A model may also provide the incremental interface used to generate a
    closed-loop rollout step by step, `init(s1, horizon) -> carry` and
    `step(carry, action) -> (carry, next_state)`; `worldmodels.incremental` gives
    any model a correct default when it does not. A model trained on one-step
    targets provides `teacher_forced(s1, actions, states)`, its predictions when
    every input state is the true one (the `TeacherForced` protocol);
    `worldmodels.loss` uses it when present.
    """

    def __hash__(self) -> int:
        # By value (`diffenvs.tree_hash`), so that `jax.jit(model.predict)` can
        # cache on the bound method, with the weights as constants.
        return diffenvs.tree_hash(self)

    @abc.abstractmethod
    def predict(
        self, s1: Float[Array, " state"], actions: Float[Array, "horizon action"]
    ) -> Float[Array, "horizon state"]:
        """The predicted states after each action, shape `(horizon, state_dim)`.
        Single example; use `jax.vmap`."""


@runtime_checkable
class Incremental(Protocol):
    """What `worldmodels.incremental` returns: a model that can be stepped."""

    def init(self, s1: Float[Array, " state"], horizon: int) -> PyTree: ...

    def step(
        self, carry: PyTree, action: Float[Array, " action"]
    ) -> tuple[PyTree, Float[Array, " state"]]: ...


@runtime_checkable
class TeacherForced(Protocol):
    """A model with one-step predictions for training: `teacher_forced(s1, actions,
    states)` predicts row t from the true states before it (`HWM`, `Markov`)."""

    def teacher_forced(
        self,
        s1: Float[Array, " state"],
        actions: Float[Array, "horizon action"],
        states: Float[Array, "horizon state"],
    ) -> Float[Array, "horizon state"]: ...


class _Buffer(eqx.Module):
    s1: Array
    actions: Array
    step: Int[Array, ""]


class PredictOnly(AbstractWorldModel):
    """The incremental interface of a model that only implements `predict`.

    Step t writes action t into a buffer of the full horizon and calls `predict`
    on the whole buffer; causality makes row t independent of the (still zero)
    actions after it. Correct, and O(H) times slower than a model's own `step`.

    Args:
        model: anything with `predict(s1, actions) -> states`.
        action_dim: the width of one action.
    """

    model: Any
    action_dim: int = eqx.field(static=True)

    def predict(self, s1, actions):
        return self.model.predict(s1, actions)

    def init(self, s1: Float[Array, " state"], horizon: int) -> _Buffer:
        actions = jnp.zeros((horizon, self.action_dim), jnp.result_type(float))
        return _Buffer(jnp.asarray(s1), actions, jnp.zeros((), jnp.int32))

    def step(self, carry: _Buffer, action):
        actions = jax.lax.dynamic_update_index_in_dim(
            carry.actions, jnp.asarray(action, carry.actions.dtype), carry.step, 0
        )
        states = self.model.predict(carry.s1, actions)
        state = jax.lax.dynamic_index_in_dim(states, carry.step, 0, keepdims=False)
        return _Buffer(carry.s1, actions, carry.step + 1), state


class Simulator(AbstractWorldModel):
    """A `diffenvs` task as a world model with an incremental interface: the carry
    is the true state and the step counter, one step is one transition
    (`diffenvs.Dynamics`).

    Prop. 1 of the papers in code: the simulator is an actions world model whose
    recurrent cell is the task's transition.
    """

    env: diffenvs.AbstractEnv

    def predict(self, s1, actions):
        return self.env.predict(s1, actions)

    def init(self, s1: Float[Array, " state"], horizon: int) -> PyTree:
        return diffenvs.Dynamics(self.env).init(s1, horizon)

    def step(self, carry: PyTree, action):
        return diffenvs.Dynamics(self.env).step(carry, action)


def incremental(model: Any, action_dim: int | None = None) -> Incremental:
    """`model` with the incremental interface `init(s1, horizon)` and
    `step(carry, action) -> (carry, next_state)`.

    A model that has its own (every built-in model does) is returned as it is; a
    `diffenvs` task becomes a `Simulator`; any other model gets the slower
    `PredictOnly` default, which needs `action_dim`.
    """
    if isinstance(model, diffenvs.AbstractEnv):
        return Simulator(model)
    if isinstance(model, Incremental):
        return model
    if not callable(getattr(model, "predict", None)):
        raise TypeError(
            f"model must implement predict(s1, actions) -> states, got "
            f"{type(model).__name__} without a predict method."
        )
    if action_dim is None:
        raise ValueError(
            f"{type(model).__name__} has no incremental interface (init and step); "
            f"pass action_dim so that the predict-only default can be built."
        )
    return PredictOnly(model, action_dim)


def unroll(
    model: Any, s1: Float[Array, " state"], actions: Float[Array, "horizon action"]
) -> Float[Array, "horizon state"]:
    """The states of an open-loop action sequence generated one step at a time
    through the incremental interface. Equal to `model.predict(s1, actions)` to
    float tolerance; this is how closed-loop generation runs. Single example."""
    return rollout(incremental(model, actions.shape[-1]), s1, actions)
