"""The BPO objective: generate, re-evaluate, reward (METHOD §4, arXiv eq. 1-3)."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

import diffenvs
import worldmodels

from ._policy import TanhGaussianPolicy


class Imagined(eqx.Module):
    """What one imagined episode gives besides the objective's value.

    Attributes:
        episode_return: Σ_k r(ŝ_k, a_k), the predicted return without the entropy.
        entropy: the mean over steps of -log π(a_k | ŝ_k), a one-sample estimate of
            the tanh-Gaussian's entropy (tanh correction included).
    """

    episode_return: Scalar
    entropy: Scalar


def objective(
    policy: TanhGaussianPolicy,
    model: Any,
    env: diffenvs.AbstractEnv,
    s1: Float[Array, " state"],
    key: PRNGKeyArray,
    *,
    entropy_coefficient: float | Array = 0.0,
    full_gradient: bool = False,
) -> tuple[Scalar, Imagined]:
    """J(θ) = Σ_k [r(ŝ_k, a_k) - α log π(a_k | ŝ_k)] of one imagined episode of the
    stochastic policy through `model` from `s1`, with a_k = π_θ(sg[ŝ_k]) (arXiv
    eq. 1-3), the reward being the task's own (`env.rewards_from_states`).

    The gradient comes from generate-then-re-evaluate (METHOD §4): the episode is
    generated step by step without gradient through the model's incremental
    interface (`worldmodels.incremental`: key-value cache, recurrent carry, the
    simulator's step, or the predict-only default); the actions are then recomputed
    from the stored states with the same per-step noise, and `model.predict` is
    called once, in parallel, with gradient. Value and gradient equal those of the
    sequential unroll with a stop-gradient on the policy input, for every model: an
    HWM's or Markov model's `predict` still feeds back its own predictions.

    Args:
        policy: the policy π_θ.
        model: anything with `predict(s1, actions) -> states`, or the task itself
            (BPO through the simulator).
        env: the task whose reward is used.
        s1: the initial state, shape `(state_dim,)`.
        key: the key of the episode's exploration noise (`diffenvs.closed_loop`).
        entropy_coefficient: α, the maximum-entropy bonus per step.
        full_gradient: differentiate the sequential unroll itself, without the
            stop-gradient on the policy input (the papers' ablation, arXiv App. F.1).

    Returns:
        J and the `Imagined` diagnostics. Single example; use `jax.vmap`.
    """
    horizon = env.horizon
    stepper = worldmodels.incremental(model, env.action_dim)
    if full_gradient:
        trajectory = diffenvs.closed_loop(stepper, policy.act, s1, key, horizon)
        observations, states = trajectory.observations, trajectory.states
    else:
        # Generation without gradient: the inputs are cut from the parameters, so
        # the step-by-step loop is never linearised.
        frozen_policy, frozen_stepper = _frozen((policy, stepper))
        trajectory = diffenvs.closed_loop(
            frozen_stepper, frozen_policy.act, s1, key, horizon
        )
        observations = jax.lax.stop_gradient(trajectory.observations)
        states = None
    keys = diffenvs.step_keys(key, horizon)
    actions, log_probs = jax.vmap(policy.sample)(observations, keys)
    if states is None:
        states = model.predict(s1, actions)
    rewards = env.rewards_from_states(s1, actions, states)
    episode_return = jnp.sum(rewards)
    value = episode_return - entropy_coefficient * jnp.sum(log_probs)
    return value, Imagined(episode_return, -jnp.mean(log_probs))


def batch_objective(
    policy: TanhGaussianPolicy,
    model: Any,
    env: diffenvs.AbstractEnv,
    s1: Float[Array, "batch state"],
    keys: PRNGKeyArray,
    *,
    entropy_coefficient: float | Array = 0.0,
    full_gradient: bool = False,
) -> tuple[Scalar, Imagined]:
    """The mean of `objective` over a batch of start states and keys (the policy
    batch), and the mean diagnostics."""
    values, imagined = jax.vmap(
        lambda s, k: objective(
            policy,
            model,
            env,
            s,
            k,
            entropy_coefficient=entropy_coefficient,
            full_gradient=full_gradient,
        )  # fmt: skip
    )(s1, keys)
    return jnp.mean(values), jax.tree.map(jnp.mean, imagined)


def _frozen(tree: Any) -> Any:
    """`tree` with a stop-gradient on every array leaf."""
    return jax.tree.map(
        lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, tree
    )
