"""The tanh-Gaussian policy of the papers (arXiv App. C)."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

import worldmodels

# The log standard deviation is squashed smoothly into this range: a hard clip
# would stop its gradient at the bounds.
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class TanhGaussianPolicy(eqx.Module):
    """a = tanh(u), u ~ N(μ(o), σ(o)²), with μ and log σ from one MLP.

    The observation o is the state and the normalised time k / H (`env.observe`);
    the state part is normalised by `normaliser` (fitted from collected data by the
    agent) before the MLP.

    Called as `policy(observation, key=None)` it is the deterministic evaluation
    policy tanh(μ), usable with `env.rollout`. Single example; use `jax.vmap`.

    Args:
        state_dim: size of a state.
        action_dim: size of an action.
        width: hidden width (the papers: 64).
        depth: number of hidden layers (the papers: 2).
        activation: hidden activation; the papers' text says ReLU (their released
            code uses swish).
        key: PRNG key for the initial weights.
    """

    mlp: eqx.nn.MLP
    normaliser: worldmodels.Normaliser
    action_dim: int = eqx.field(static=True)

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        *,
        width: int = 64,
        depth: int = 2,
        activation: Callable[[Array], Array] = jax.nn.relu,
        key: PRNGKeyArray,
    ):
        self.mlp = eqx.nn.MLP(
            state_dim + 1, 2 * action_dim, width, depth, activation=activation, key=key
        )
        self.normaliser = worldmodels.Normaliser.identity(state_dim)
        self.action_dim = action_dim

    def distribution(
        self, observation: Float[Array, " obs"]
    ) -> tuple[Float[Array, " action"], Float[Array, " action"]]:
        """The mean μ and log standard deviation log σ of the pre-tanh Gaussian."""
        state, time = observation[:-1], observation[-1:]
        out = self.mlp(jnp.concatenate([self.normaliser.normalise(state), time]))
        mean, raw = out[: self.action_dim], out[self.action_dim :]
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(raw) + 1)
        return mean, log_std

    def __call__(
        self, observation: Float[Array, " obs"], key: PRNGKeyArray | None = None
    ) -> Float[Array, " action"]:
        """The deterministic action tanh(μ(o)); `key` is ignored."""
        del key
        return jnp.tanh(self.distribution(observation)[0])

    def sample(
        self, observation: Float[Array, " obs"], key: PRNGKeyArray
    ) -> tuple[Float[Array, " action"], Scalar]:
        """A reparameterised sample a = tanh(μ + σ ε), ε ~ N(0, 1) drawn from `key`,
        and its log-density log π(a | o), tanh correction included:

            log π(a | o) = log N(u; μ, σ²) - Σ_i log(1 - tanh(u_i)²).

        The same key gives the same ε, so re-evaluating the sample at new
        parameters is exact (and differentiable)."""
        mean, log_std = self.distribution(observation)
        noise = jr.normal(key, mean.shape, mean.dtype)
        u = mean + jnp.exp(log_std) * noise
        gaussian = -0.5 * noise**2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
        # log(1 - tanh(u)²) = 2 (log 2 - u - softplus(-2u)), stable for large |u|.
        correction = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
        return jnp.tanh(u), jnp.sum(gaussian - correction)

    def act(
        self, observation: Float[Array, " obs"], key: PRNGKeyArray
    ) -> Float[Array, " action"]:
        """A sampled action only: the exploration policy, `policy(observation, key)`
        in the form `env.rollout` and `diffenvs.closed_loop` take."""
        return self.sample(observation, key)[0]
