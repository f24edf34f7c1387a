"""Helpers shared by the test suites.

The jitted wrappers below take the task as an argument instead of closing over it,
so that one compiled function serves every test that uses the same task class,
horizon and solver: `eqx.filter_jit` traces the task's constants as dynamic arrays
and keys its cache on the task's structure only.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, PRNGKeyArray

import diffenvs
import worldmodels

# The error `eqx.error_if` raises at run time. Older Equinox versions raised the
# backend's runtime error instead; both are subclasses of RuntimeError.
EquinoxRuntimeError = getattr(eqx, "EquinoxRuntimeError", RuntimeError)


def x64_enabled() -> bool:
    """Whether arrays created now default to float64."""
    return jnp.asarray(1.0).dtype == jnp.float64


def make_float64(name: str, horizon: int, **options) -> diffenvs.AbstractEnv:
    """`diffenvs.make` for a test that runs inside the `x64` fixture.

    Every floating-point constant of the returned task is float64, and so is every
    array the task creates later (its initial state, its states and rewards).
    """
    if not x64_enabled():
        raise RuntimeError("make_float64 needs float64 enabled: use the x64 fixture.")
    env = diffenvs.make(name, horizon=horizon, **options)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(env) if eqx.is_inexact_array(leaf)}
    assert dtypes <= {jnp.dtype(jnp.float64)}, dtypes
    return env


def uniform_actions(
    key: PRNGKeyArray,
    env: diffenvs.AbstractEnv,
    low: float = -1.0,
    high: float = 1.0,
    batch: tuple[int, ...] = (),
) -> Array:
    """I.i.d. uniform actions of shape `(*batch, horizon, action_dim)`, in the
    default float dtype."""
    shape = (*batch, env.horizon, env.action_dim)
    return jr.uniform(key, shape, float, low, high)


def central_differences(fn: Callable[[Array], Array], x: Array, eps: float) -> Array:
    """The gradient of the scalar function `fn` at `x` by central differences,
    (fn(x + eps e_i) - fn(x - eps e_i)) / (2 eps), evaluated as one batch."""
    basis = jnp.eye(x.size, dtype=x.dtype).reshape(x.size, *x.shape)
    plus = jax.vmap(lambda e: fn(x + eps * e))(basis)
    minus = jax.vmap(lambda e: fn(x - eps * e))(basis)
    return ((plus - minus) / (2 * eps)).reshape(x.shape)


def scale_constants(env: diffenvs.AbstractEnv, factor: float) -> diffenvs.AbstractEnv:
    """The task with every floating-point constant multiplied by `factor`: the same
    structure with new values."""
    return jax.tree.map(
        lambda leaf: leaf * factor if eqx.is_inexact_array(leaf) else leaf, env
    )


def assert_close(actual, expected, *, rtol: float, err_msg: str = "") -> None:
    """|actual - expected| <= rtol * scale elementwise, where the scale of each
    column (the last axis; the whole array if 1-D) is the largest |expected| in it.

    A relative tolerance per element would be meaningless for entries near zero,
    which arise by cancellation (a reward K x - u close to 0) and carry the rounding
    error of the large terms they came from; the column's magnitude is the right
    yardstick for rounding error.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    axes = tuple(range(expected.ndim - 1)) if expected.ndim > 1 else None
    scale = np.max(np.abs(expected), axis=axes, keepdims=expected.ndim > 1)
    bound = np.broadcast_to(rtol * scale, expected.shape)
    # `tiny` lets a column that is exactly zero in both compare equal.
    np.testing.assert_array_less(
        np.abs(actual - expected), bound + np.finfo(expected.dtype).tiny, err_msg
    )


class Replay(eqx.Module):
    """A deterministic policy that replays an open-loop action sequence.

    It reads the step k from the normalised time k / H, the observation's last
    entry, so that a closed-loop rollout of it reproduces `predict` on the same
    actions.
    """

    actions: Array

    def __call__(self, observation: Array, key: PRNGKeyArray) -> Array:
        del key
        horizon = self.actions.shape[0]
        step = jnp.round(observation[-1] * horizon).astype(jnp.int32)
        return self.actions[step]


@eqx.filter_jit
def jit_evaluate(env, s1, actions):
    """`predict`, `rewards`, `episode_return` and the gradient of the latter with
    respect to the actions, as one compiled function: one compilation per task
    serves every test that needs any of them."""
    states = env.predict(s1, actions)
    rewards = env.rewards(s1, actions)
    episode_return, grad = jax.value_and_grad(env.episode_return)(actions)
    return states, rewards, episode_return, grad


@eqx.filter_jit
def jit_step(env, env_state, action):
    return env.step(env_state, action)


@eqx.filter_jit
def jit_rollout(env, policy, key):
    return env.rollout(policy, key)


class GRUModel(eqx.Module):
    """An actions world model: a GRU reads the actions; its hidden state, started
    from s1, is decoded into the change of state since s1."""

    encode: eqx.nn.Linear
    cell: eqx.nn.GRUCell
    decode: eqx.nn.Linear

    def __init__(self, state_dim, action_dim, hidden=32, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.encode = eqx.nn.Linear(state_dim, hidden, key=k1)
        self.cell = eqx.nn.GRUCell(action_dim, hidden, key=k2)
        self.decode = eqx.nn.Linear(hidden, state_dim, key=k3)

    def predict(self, s1, actions):
        def step(h, a):
            h = self.cell(a, h)
            return h, s1 + self.decode(h)

        _, states = jax.lax.scan(step, jnp.tanh(self.encode(s1)), actions)
        return states


def sequential_objective(policy, model, env, s1, key, alpha, *, stop=True):
    """The BPO objective by a plain differentiable scan of the model's incremental
    step with the policy in the loop; `stop` puts the stop-gradient on the policy
    input: the reference that `agents.objective` is checked and timed against."""
    stepper = worldmodels.incremental(model, env.action_dim)
    horizon = env.horizon
    keys = diffenvs.step_keys(key, horizon)

    def body(carry, inputs):
        inner, state = carry
        k, step_key = inputs
        seen = diffenvs.observation(state, k, horizon)
        seen = jax.lax.stop_gradient(seen) if stop else seen
        action, log_prob = policy.sample(seen, step_key)
        inner, next_state = stepper.step(inner, action)
        return (inner, next_state), (action, next_state, log_prob)

    init = (stepper.init(s1, horizon), s1)
    _, (actions, states, log_probs) = jax.lax.scan(
        body, init, (jnp.arange(horizon), keys)
    )
    rewards = env.rewards_from_states(s1, actions, states)
    return jnp.sum(rewards) - alpha * jnp.sum(log_probs)
