"""Step-by-step rollouts through a model's `init` and `step`, differentiable in
both modes, with a reverse-mode derivative that keeps a cache (a transformer's
key-value cache) once rather than once per step.

Scanning `step` and differentiating the scan in reverse mode stores, for every
step, everything the step's derivative needs, and a transformer's step reads its
whole key-value cache, so the stored caches grow with the square of the horizon.
But step t writes row t of each cache buffer and reads only rows 0 ... t, so the
step computes the same from the final cache as from its own: in the derivative,
every step can read the one final cache, and stores only its small inputs.

So a rollout whose carry holds an `AbstractCache` gets a custom forward-mode rule:
run the steps to get the states and the final cache, then propagate tangents with
a second scan whose step t reads the final cache (rows after t are masked, so they
change nothing) and carries the tangent of the cache. Reverse mode transposes
that scan; each step is rematerialised from its inputs, so the derivative stores
O(H) numbers per example instead of O(H²), at the cost of recomputing the
forward pass once.

A step also reads its buffers' whole length, rows after its own masked. So these
rollouts run in a few segments of equal length, each with buffers only as long as
its last step needs: the steps then read H/2 + H/(2n) rows on average over n
segments instead of H. Each segment is one more loop to compile, hence few of
them.
"""

from __future__ import annotations

import abc
from typing import Any, Self

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class AbstractCache(eqx.Module):
    """A part of a step's carry that the rollouts treat as a cache: buffers of one
    row per step, and the position of the next step.

    The contract: a step writes row `position` of every buffer and reads rows
    0 ... `position` only, so it computes the same from any later state of the
    buffers (one with more rows written, or more rows after them). The derivative
    of `rollout` relies on it: every step reads the final buffers.
    """

    @abc.abstractmethod
    def without_buffers(self) -> Self:
        """The cache with its buffers removed (`None`), everything else kept."""

    @abc.abstractmethod
    def with_buffers(self, other: Self) -> Self:
        """This cache (without buffers, say) with the buffers of `other`."""

    @abc.abstractmethod
    def resized(self, length: int) -> Self:
        """The cache with buffers of `length` rows: the first `length` rows of
        these, or these followed by rows of zeros; the caller keeps
        `position < length`."""


def rollout(
    stepper: Any,
    s1: Float[Array, " state"],
    actions: Float[Array, "horizon action"],
    *,
    segment: int = 128,
    max_segments: int = 4,
) -> Float[Array, "horizon state"]:
    """The states from `stepper.init(s1, H)` and `stepper.step` over `actions`.

    Equal to a `jax.lax.scan` of `stepper.step`, in value and in both modes of
    differentiation (to float tolerance); a carry that holds an `AbstractCache`
    takes the route above, in `H // segment` segments (at least one, at most
    `max_segments`).
    """
    carry = jax.eval_shape(lambda: stepper.init(s1, actions.shape[0]))
    if not any(_is_cache(x) for x in jax.tree.leaves(carry, is_leaf=_is_cache)):
        return _plain_scan(stepper, s1, actions)
    stops = _segment_stops(actions.shape[0], segment, max_segments)
    return _cached_rollout(stepper, s1, actions, stops=stops)


def _plain_scan(stepper, s1, actions):
    """`stepper.step` scanned, differentiated by JAX alone."""
    carry = stepper.init(s1, actions.shape[0])
    _, states = jax.lax.scan(_step_of(stepper), carry, actions)
    return states


def _step_of(stepper):
    # A plain function rather than the bound method: `jax.lax.scan` hashes the
    # function it is given, and an Equinox bound method hashes its module's arrays.
    return lambda carry, action: stepper.step(carry, action)


def _is_cache(x: Any) -> bool:
    return isinstance(x, AbstractCache)


def _segment_stops(horizon: int, segment: int, max_segments: int) -> tuple[int, ...]:
    """Where each segment of a rollout of `horizon` steps ends (equal lengths)."""
    if segment <= 0 or max_segments <= 0:
        raise ValueError(
            "segment and max_segments must be positive, got "
            f"segment={segment} and max_segments={max_segments}."
        )
    count = max(1, min(max_segments, horizon // segment))
    return tuple(horizon * (i + 1) // count for i in range(count))


def _resized(carry, length: int):
    """`carry` with every cache's buffers resized to `length` rows."""
    return jax.tree.map(
        lambda x: x.resized(length) if _is_cache(x) else x, carry, is_leaf=_is_cache
    )


def _segmented_scan(body_for, carry, xs, stops: tuple[int, ...]):
    """`jax.lax.scan` over the rows of `xs` in segments; the segment that ends at
    step `stop` runs `body_for(stop)` with the caches in its carry resized to
    `stop` rows."""
    outputs, start = [], 0
    for stop in stops:
        segment = jax.tree.map(lambda x, a=start, b=stop: x[a:b], xs)
        carry, output = jax.lax.scan(body_for(stop), _resized(carry, stop), segment)
        outputs.append(output)
        start = stop
    return carry, jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)


def _scan_with_history(stepper, s1, actions, stops):
    """The final carry, every step's carry without its cache buffers, the states."""

    def body(carry, action):
        new, state = stepper.step(carry, action)
        return new, (_without_buffers(carry), state)

    init = stepper.init(s1, actions.shape[0])
    final, (partials, states) = _segmented_scan(lambda _: body, init, actions, stops)
    return final, partials, states


def _without_buffers(carry):
    return jax.tree.map(
        lambda x: x.without_buffers() if _is_cache(x) else x, carry, is_leaf=_is_cache
    )


def _with_buffers(partial, final):
    """`partial` (a step's carry without its buffers) with `final`'s buffers."""
    return jax.tree.map(
        lambda x, full: x.with_buffers(full) if _is_cache(x) else x,
        partial,
        final,
        is_leaf=_is_cache,
    )


def _zeros_for_none(tangent, primal):
    """`tangent` with an explicit zero wherever a floating-point leaf of `primal` has
    the symbolic zero `None`, so that it can be a loop carry of fixed structure."""
    return jax.tree.map(
        lambda t, p: jnp.zeros_like(p) if t is None and eqx.is_inexact_array(p) else t,
        tangent,
        primal,
        is_leaf=lambda t: t is None,
    )


@eqx.filter_custom_jvp
def _cached_rollout(stepper, s1, actions, *, stops):
    init = stepper.init(s1, actions.shape[0])
    return _segmented_scan(lambda _: _step_of(stepper), init, actions, stops)[1]


@_cached_rollout.def_jvp
def _cached_rollout_jvp(primals, tangents, *, stops):
    stepper, s1, actions = primals
    stepper_tangent, s1_tangent, actions_tangent = tangents
    horizon = actions.shape[0]
    final, partials, states = _scan_with_history(stepper, s1, actions, stops)

    init = lambda model, s: model.init(s, horizon)  # noqa: E731
    carry, carry_tangent = eqx.filter_jvp(
        init, (stepper, s1), (stepper_tangent, s1_tangent)
    )
    carry_tangent = _zeros_for_none(carry_tangent, carry)
    actions_tangent = _zeros_for_none(actions_tangent, actions)

    @eqx.filter_checkpoint
    def tangent_step(final, carry_tangent, partial, action, action_tangent):
        # Step t's carry rebuilt with the final cache (cut to the segment's
        # length); reverse mode stores only these arguments and recomputes the step.
        carry = _with_buffers(partial, final)
        step = lambda model, c, a: model.step(c, a)  # noqa: E731
        (new, _), (new_tangent, state_tangent) = eqx.filter_jvp(
            step,
            (stepper, carry, action),
            (stepper_tangent, carry_tangent, action_tangent),
        )
        return _zeros_for_none(new_tangent, new), _zeros_for_none(
            state_tangent, states[0]
        )

    def body_for(stop):
        final_cut = _resized(final, stop)
        return lambda carry_tangent, inputs: tangent_step(
            final_cut, carry_tangent, *inputs
        )

    _, states_tangent = _segmented_scan(
        body_for, carry_tangent, (partials, actions, actions_tangent), stops
    )
    return states, states_tangent
