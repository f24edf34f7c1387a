"""A replay buffer of whole episodes, of fixed capacity (a ring)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

import worldmodels


class ReplayBuffer(eqx.Module):
    """The last `capacity` episodes collected, as fixed-size arrays (so the buffer
    is a loop carry under `jit` and `vmap`).

    Attributes:
        s1: shape `(capacity, state_dim)`.
        actions: shape `(capacity, horizon, action_dim)`.
        states: shape `(capacity, horizon, state_dim)`.
        size: the number of episodes held, at most `capacity`.
        position: where the next episode is written.
    """

    s1: Float[Array, "capacity state"]
    actions: Float[Array, "capacity horizon action"]
    states: Float[Array, "capacity horizon state"]
    size: Int[Array, ""]
    position: Int[Array, ""]

    @classmethod
    def empty(
        cls, capacity: int, horizon: int, state_dim: int, action_dim: int, dtype
    ) -> ReplayBuffer:
        zero = jnp.zeros((), jnp.int32)
        return cls(
            jnp.zeros((capacity, state_dim), dtype),
            jnp.zeros((capacity, horizon, action_dim), dtype),
            jnp.zeros((capacity, horizon, state_dim), dtype),
            zero,
            zero,
        )

    @property
    def capacity(self) -> int:
        return self.s1.shape[0]

    def add(
        self,
        s1: Float[Array, " state"],
        actions: Float[Array, "horizon action"],
        states: Float[Array, "horizon state"],
        keep: Bool[Array, ""] | bool = True,
    ) -> ReplayBuffer:
        """The buffer with one episode written over the oldest, if `keep`."""

        def write(buffer, row):
            # Select the row, not the buffer: the update then stays in place.
            old = jax.lax.dynamic_index_in_dim(buffer, self.position, 0, False)
            row = jnp.where(keep, row.astype(buffer.dtype), old)
            return jax.lax.dynamic_update_index_in_dim(buffer, row, self.position, 0)

        keep = jnp.asarray(keep)
        return ReplayBuffer(
            write(self.s1, s1),
            write(self.actions, actions),
            write(self.states, states),
            jnp.where(keep, jnp.minimum(self.size + 1, self.capacity), self.size),
            jnp.where(keep, (self.position + 1) % self.capacity, self.position),
        )

    def sample(self, key: PRNGKeyArray, batch_size: int) -> worldmodels.Episodes:
        """`batch_size` episodes drawn uniformly with replacement from those held."""
        index = jr.randint(key, (batch_size,), 0, jnp.maximum(self.size, 1))
        return worldmodels.Episodes(
            self.s1[index], self.actions[index], self.states[index]
        )

    def normaliser(self) -> worldmodels.Normaliser:
        """Per-dimension mean and standard deviation of every state held (initial
        states included), as `worldmodels.Normaliser.from_states` computes them."""
        all_states = jnp.concatenate([self.s1[:, None], self.states], axis=1)
        held = (jnp.arange(self.capacity) < self.size)[:, None, None]
        weight = held / (jnp.maximum(self.size, 1) * all_states.shape[1])
        mean = jnp.sum(weight * all_states, axis=(0, 1))
        var = jnp.sum(weight * (all_states - mean) ** 2, axis=(0, 1))
        std = jnp.sqrt(var)
        constant = std <= 1e-6 * jnp.maximum(jnp.abs(mean), 1.0)
        return worldmodels.Normaliser(mean, jnp.where(constant, 1.0, std))
