"""A task's constants: array leaves, checked when the task is built."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import as_array_or_same


def param(value: float):
    """A task constant as a field: an array leaf, so one may differentiate or `vmap`
    over it. `AbstractEnv` checks at construction that it is a real scalar, and a
    finite one unless traced (`check_constants`)."""
    return eqx.field(
        default=value, converter=as_array_or_same, metadata={"constant": True}
    )


def check_constants(module: eqx.Module) -> None:
    """Raise unless every field declared with `param` holds a real scalar array,
    finite unless traced; the error names the field and the class."""
    for field in dataclasses.fields(module):
        if not field.metadata.get("constant"):
            continue
        value = getattr(module, field.name)
        where = f"{field.name} (a constant of {type(module).__name__})"
        if (
            not isinstance(value, jax.Array)
            or not jnp.issubdtype(value.dtype, jnp.number)
            or jnp.issubdtype(value.dtype, jnp.complexfloating)
        ):
            raise TypeError(f"{where} must be a real number, got {value!r}.")
        if value.shape != ():
            raise ValueError(
                f"{where} must be a scalar, got an array of shape {value.shape}; "
                f"for a batch of tasks, build one task per value and stack them "
                f"(docs/envs.md)."
            )
        if not isinstance(value, jax.core.Tracer) and not np.isfinite(value):
            raise ValueError(f"{where} must be finite, got {float(value)}.")
