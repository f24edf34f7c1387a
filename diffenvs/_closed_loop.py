"""Closed-loop generation: a policy run step by step through anything that steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._errors import error_if

Policy = Callable[[Float[Array, " obs"], PRNGKeyArray], Float[Array, " action"]]


@runtime_checkable
class Stepper(Protocol):
    """Anything that generates states one action at a time: a task's true dynamics,
    or a world model's incremental interface (`worldmodels.incremental`)."""

    def init(self, s1: Float[Array, " state"], horizon: int) -> Any: ...

    def step(
        self, carry: Any, action: Float[Array, " action"]
    ) -> tuple[Any, Float[Array, " state"]]: ...


class Trajectory(eqx.Module):
    """A closed-loop trajectory. Row k of every field belongs to step k:
    `observations[k]` is what the policy saw (the state x_k with k / H appended),
    `actions[k]` what it did, `states[k]` the state x_{k+1} that followed."""

    observations: Float[Array, "horizon obs"]
    actions: Float[Array, "horizon action"]
    states: Float[Array, "horizon state"]


def observation(
    state: Float[Array, " state"], step: Array, horizon: int
) -> Float[Array, " obs"]:
    """The policy's observation of state x_k at step k: `[x_k, k / H]`."""
    # Cast before dividing: an int32 counter divided by an int is float32 even under
    # float64, which would round k / H in a float64 rollout.
    time = jnp.asarray(step).astype(state.dtype) / horizon
    return jnp.concatenate([state, time[None]])


def closed_loop(
    stepper: Stepper,
    policy: Policy,
    s1: Float[Array, " state"],
    key: PRNGKeyArray,
    horizon: int,
) -> Trajectory:
    """Run `policy` in closed loop through `stepper` for `horizon` steps from `s1`.

    This is the one implementation of closed-loop generation in the package:
    `AbstractEnv.rollout`, the world models' generation and the BPO agent all call
    it. It is a plain `jax.lax.scan`, differentiable like any other; wrap the
    policy's input in `jax.lax.stop_gradient` for the papers' stop-gradient unroll
    (arXiv eq. 1-3), or wrap the result for generation without gradient.

    Args:
        stepper: anything with `init(s1, horizon)` and `step(carry, action) ->
            (carry, next_state)`, e.g. `worldmodels.incremental(model, action_dim)`.
        policy: called as `policy(observation, key)` at step k with the k-th of
            `jax.random.split(key, horizon)`; returns an action.
        s1: the initial state, shape `(state_dim,)`.
        key: a JAX PRNG key; the same key gives the same per-step keys, so a
            stochastic policy's actions can be re-evaluated exactly afterwards.
        horizon: the number of steps H.

    Returns:
        A `Trajectory`. Single example; use `jax.vmap`.
    """
    s1 = jnp.asarray(s1)

    def body(carry, inputs):
        model_carry, state = carry
        step, step_key = inputs
        seen = observation(state, step, horizon)
        action = policy(seen, step_key)
        model_carry, next_state = stepper.step(model_carry, action)
        return (model_carry, next_state), (seen, action, next_state)

    inputs = (jnp.arange(horizon), jr.split(key, horizon))
    init = (stepper.init(s1, horizon), s1)
    _, (observations, actions, states) = jax.lax.scan(body, init, inputs)
    return Trajectory(observations, actions, states)


def step_keys(key: PRNGKeyArray, horizon: int) -> PRNGKeyArray:
    """The per-step keys `closed_loop` hands the policy, shape `(horizon,)`."""
    return jr.split(key, horizon)


class Dynamics(eqx.Module):
    """A task's true dynamics as a `Stepper`: the carry is the state x_k and the
    step counter k, and one step is one transition (actions clipped to `[-1, 1]`).

    Args:
        env: a `diffenvs` task.
    """

    env: Any

    def init(self, s1: Float[Array, " state"], horizon: int) -> tuple[Array, Array]:
        if horizon != self.env.horizon:
            raise ValueError(
                f"horizon={horizon} differs from the task's horizon={self.env.horizon}."
            )
        s1 = jnp.asarray(s1)
        s1 = error_if(
            s1,
            ~jnp.all(jnp.isfinite(s1)),
            f"{getattr(self.env, 'name', 'the task')}: the state given (s1) is not "
            f"finite.",
        )
        return s1, jnp.zeros((), jnp.int32)

    def step(
        self, carry: tuple[Array, Array], action: Float[Array, " action"]
    ) -> tuple[tuple[Array, Array], Float[Array, " state"]]:
        state, step = carry
        action = jnp.clip(action, -1.0, 1.0)
        # The task's own step body, as in `predict` and `step`; its reward and
        # finiteness flag are unused here, and JAX drops them.
        next_state, _, _ = self.env._step(step, state, action)
        return (next_state, step + 1), next_state
