"""Per-dimension affine normalisation of states, fitted from data."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class Normaliser(eqx.Module):
    """z = (s - mean) / scale, per state dimension.

    The task states span orders of magnitude (HIV's are about 800, timber's reach
    15000), so every built-in model works on z. The statistics are data, not
    parameters: they carry no gradient, and `worldmodels.fit` leaves them out of
    the optimiser.

    Attributes:
        mean: shape `(state_dim,)`.
        scale: shape `(state_dim,)`, positive.
    """

    mean: Float[Array, " state"]
    scale: Float[Array, " state"]

    @classmethod
    def identity(cls, state_dim: int) -> Normaliser:
        """The normaliser that changes nothing: mean 0, scale 1."""
        return cls(jnp.zeros(state_dim), jnp.ones(state_dim))

    @classmethod
    def from_states(cls, states: Float[Array, "... state"]) -> Normaliser:
        """Mean and standard deviation of each dimension over all leading axes.

        A dimension that never varies (the standard deviation is below 1e-6 of its
        magnitude, or zero) gets scale 1, so it is shifted but not blown up.
        """
        states = jnp.asarray(states)
        flat = states.reshape(-1, states.shape[-1])
        mean = jnp.mean(flat, axis=0)
        std = jnp.std(flat, axis=0)
        constant = std <= 1e-6 * jnp.maximum(jnp.abs(mean), 1.0)
        return cls(mean, jnp.where(constant, 1.0, std))

    def normalise(self, states: Float[Array, "... state"]) -> Float[Array, "... state"]:
        mean, scale = jax.lax.stop_gradient((self.mean, self.scale))
        return (states - mean) / scale

    def denormalise(self, z: Float[Array, "... state"]) -> Float[Array, "... state"]:
        mean, scale = jax.lax.stop_gradient((self.mean, self.scale))
        return z * scale + mean
