"""Episodes, the prediction loss and `fit`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray, Scalar
from tqdm.auto import tqdm

import diffenvs

from ._checks import array_if_possible, check_key
from ._model import TeacherForced
from ._normaliser import Normaliser


class Episodes(eqx.Module):
    """A dataset of episodes: initial states, actions and the states that
    followed, with row t of `states` the state after action t.

    Attributes:
        s1: shape `(episodes, state_dim)`.
        actions: shape `(episodes, horizon, action_dim)`.
        states: shape `(episodes, horizon, state_dim)`.
    """

    s1: Float[Array, "episodes state"] = eqx.field(converter=array_if_possible)
    actions: Float[Array, "episodes horizon action"] = eqx.field(
        converter=array_if_possible
    )
    states: Float[Array, "episodes horizon state"] = eqx.field(
        converter=array_if_possible
    )

    def __check_init__(self):
        for name, ndim, axes in (
            ("s1", 2, "(episodes, state_dim)"),
            ("actions", 3, "(episodes, horizon, action_dim)"),
            ("states", 3, "(episodes, horizon, state_dim)"),
        ):
            value = getattr(self, name)
            if not isinstance(value, jax.Array) or not jnp.issubdtype(
                value.dtype, jnp.floating
            ):
                raise TypeError(
                    f"Episodes.{name} must be a floating-point array, got "
                    f"{_describe(value)}."
                )
            if value.ndim != ndim:
                raise ValueError(
                    f"Episodes.{name} must have shape {axes}, got shape "
                    f"{value.shape}; for a single episode, add a leading axis of 1."
                )
        n, horizon, _ = self.actions.shape
        if self.s1.shape[0] != n or self.states.shape[:2] != (n, horizon):
            raise ValueError(
                f"Episodes needs s1 (episodes, state_dim), actions (episodes, "
                f"horizon, action_dim) and states (episodes, horizon, state_dim) "
                f"that agree, got shapes {self.s1.shape}, {self.actions.shape}, "
                f"{self.states.shape}."
            )
        if self.states.shape[2] != self.s1.shape[1]:
            raise ValueError(
                f"s1 and states must have the same state_dim, got {self.s1.shape[1]} "
                f"and {self.states.shape[2]}."
            )
        # Concrete data only: under jit (a batch drawn from a buffer) the values
        # are not known here.
        for name in ("s1", "actions", "states"):
            value = getattr(self, name)
            if isinstance(value, jax.core.Tracer):
                continue
            bad = ~np.isfinite(np.asarray(value))
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"Episodes.{name} holds {int(bad.sum())} non-finite value(s), the "
                    f"first at index {where} (episode {where[0]}); a model trained "
                    f"on them would predict NaN. Drop or repair those episodes."
                )

    @classmethod
    def from_env(
        cls, env: diffenvs.AbstractEnv, actions: Float[Array, "episodes horizon action"]
    ) -> Episodes:
        """The episodes of `env` from its initial state under each action sequence
        (open loop), simulated in one batch. Actions are clipped to `[-1, 1]`, as
        the task itself does, so the stored actions are the ones applied."""
        actions = jnp.asarray(actions)
        if actions.ndim != 3 or actions.shape[1:] != (env.horizon, env.action_dim):
            raise ValueError(
                f"actions must have shape (episodes, horizon, action_dim) = "
                f"(episodes, {env.horizon}, {env.action_dim}) for task "
                f"{env.name!r}, got shape {actions.shape}; for a single episode, "
                f"add a leading axis of 1."
            )
        actions = jnp.clip(actions, -1.0, 1.0)
        s1 = jnp.broadcast_to(env.initial_state(), (actions.shape[0], env.state_dim))
        return cls(s1, actions, _simulate(env, s1, actions))

    def __len__(self) -> int:
        return self.actions.shape[0]


def _describe(value: Any) -> str:
    if isinstance(value, jax.Array | np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"{type(value).__name__} {value!r}"[:200]


def _check_optimiser(optimiser: Any) -> None:
    if not isinstance(optimiser, optax.GradientTransformation):
        hint = "; call it first, e.g. optax.adam(1e-3)" if callable(optimiser) else ""
        raise TypeError(
            f"optimiser must be an optax.GradientTransformation, got "
            f"{optimiser!r}{hint}."
        )


@eqx.filter_jit
def _simulate(env, s1, actions):
    return jax.vmap(env.predict)(s1, actions)


def loss(
    model: Any,
    s1: Float[Array, " state"],
    actions: Float[Array, "horizon action"],
    states: Float[Array, "horizon state"],
    scale: Float[Array, " state"] | None = None,
) -> Scalar:
    """The mean squared error of a model's predicted state sequence against one
    episode's true states (METHOD §2), each dimension divided by `scale`.

    A model with a `teacher_forced` method (HWM, Markov) is scored on its
    teacher-forced predictions, where every state it reads is the true one;
    any other model on `predict`. Single example; use `jax.vmap`.
    """
    s1, actions, states = (jnp.asarray(x) for x in (s1, actions, states))
    if actions.ndim != 2 or s1.ndim != 1:
        raise ValueError(
            f"loss takes one episode: s1 of shape (state_dim,) and actions of shape "
            f"(horizon, action_dim), got shapes {s1.shape} and {actions.shape}; "
            f"batch with jax.vmap."
        )
    if states.shape != (actions.shape[0], s1.shape[0]):
        raise ValueError(
            f"states must have shape (horizon, state_dim) = "
            f"{(actions.shape[0], s1.shape[0])} to match s1 and actions, got shape "
            f"{states.shape}."
        )
    if isinstance(model, TeacherForced):
        predicted = model.teacher_forced(s1, actions, states)
    else:
        predicted = model.predict(s1, actions)
    error = predicted - states
    if scale is not None:
        error = error / scale
    return jnp.mean(jnp.square(error))


def _is_normaliser(node: Any) -> bool:
    return isinstance(node, Normaliser)


def parameters(model: Any) -> Any:
    """The filter of the model's trainable parameters (for `eqx.partition`): every
    floating-point array except the statistics of its normalisers."""
    return jax.tree.map(
        lambda node: False if _is_normaliser(node) else eqx.is_inexact_array(node),
        model,
        is_leaf=_is_normaliser,
    )


def with_normaliser(model: Any, normaliser: Normaliser) -> Any:
    """`model` with every `Normaliser` inside it replaced by `normaliser`."""
    return jax.tree.map(
        lambda node: normaliser if _is_normaliser(node) else node,
        model,
        is_leaf=_is_normaliser,
    )


# One optimiser object for every call: `fit` compiles its training loop once per
# model structure, and a new default object at every call would compile it anew.
DEFAULT_OPTIMISER = optax.chain(optax.clip_by_global_norm(100.0), optax.adam(1e-3))


def init_optimiser(
    model: Any, optimiser: optax.GradientTransformation = DEFAULT_OPTIMISER
) -> optax.OptState:
    """The optimiser state for the trainable parameters of `model`."""
    return optimiser.init(eqx.filter(model, parameters(model)))


def update(
    model: Any,
    opt_state: optax.OptState,
    batch: Episodes,
    *,
    optimiser: optax.GradientTransformation = DEFAULT_OPTIMISER,
    scale: Float[Array, " state"] | None = None,
) -> tuple[Any, optax.OptState, Scalar]:
    """One gradient step of `loss`, averaged over a batch of episodes.

    Pure: jit it, vmap it over seeds, or scan it; `fit` is a host loop over it.

    Args:
        model: any world model; its `parameters` are trained.
        opt_state: from `init_optimiser(model, optimiser)`.
        batch: the episodes of this step.
        optimiser: an Optax optimiser (by default Adam 1e-3 after clipping the
            gradient norm at 100, arXiv App. C).
        scale: per-dimension divisor of the error (see `loss`).

    Returns:
        The new model, the new optimiser state and the batch's loss before the step.
    """
    _check_optimiser(optimiser)
    params, static = eqx.partition(model, parameters(model))

    def batch_loss(params):
        model = eqx.combine(params, static)
        per_episode = jax.vmap(lambda *e: loss(model, *e, scale=scale))(
            batch.s1, batch.actions, batch.states
        )
        return jnp.mean(per_episode)

    value, grads = jax.value_and_grad(batch_loss)(params)
    updates, opt_state = optimiser.update(grads, opt_state, params)
    return eqx.combine(eqx.apply_updates(params, updates), static), opt_state, value


def fit(
    model: Any,
    episodes: Episodes,
    *,
    key: PRNGKeyArray,
    steps: int = 1000,
    batch_size: int = 64,
    optimiser: optax.GradientTransformation | None = None,
    normalise: bool = True,
    progress: bool = False,
    devices: Sequence[Any] | None = None,
) -> tuple[Any, Float[Array, " steps"]]:
    """Train `model` on `episodes` by minibatch gradient descent on `loss`.

    Each step draws `batch_size` episodes uniformly with replacement. The loss of
    each state dimension is divided by its standard deviation in `episodes`, so
    that no dimension dominates because of its units. The training loop is one
    compiled `lax.scan` per chunk of steps.

    Args:
        model: any world model; its floating-point arrays are trained, except
            those of a `Normaliser`.
        episodes: the training data.
        key: PRNG key for the minibatches.
        steps: number of gradient steps.
        batch_size: episodes per step (the papers use 64).
        optimiser: an Optax optimiser; by default Adam with learning rate 1e-3
            after clipping the gradient norm at 100 (arXiv App. C).
        normalise: replace every `Normaliser` in the model by one fitted to the
            states of `episodes` before training. Pass `False` to continue
            training a model whose normaliser is already fitted: refitting it
            changes what the trained weights see.
        progress: show a progress bar.
        devices: split every minibatch evenly over these `jax.Device`s (data
            parallelism): the model, the optimiser state and the episodes are
            replicated on each, and the gradient is averaged over the whole batch,
            so the result is the one-device result up to summation order.
            `batch_size` must be a multiple of their number. The trained model is
            returned replicated on them. On CPU, one device per core comes from
            setting `XLA_FLAGS=--xla_force_host_platform_device_count=N` before JAX
            starts (benchmarks/test_models.py measures the gain).

    Returns:
        The trained model and the loss of every step, shape `(steps,)`.
    """
    check_key(key)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got steps={steps!r}.")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size <= 0
    ):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    split = None if devices is None else _batch_sharding(devices, batch_size)
    if optimiser is None:
        optimiser = DEFAULT_OPTIMISER
    _check_optimiser(optimiser)
    if not isinstance(episodes, Episodes):
        raise TypeError(
            f"episodes must be worldmodels.Episodes, got {type(episodes).__name__}."
        )
    if len(episodes) == 0:
        raise ValueError("episodes is empty: fit needs at least one episode.")
    all_states = jnp.concatenate([episodes.s1[:, None], episodes.states], axis=1)
    statistics = Normaliser.from_states(all_states)
    if normalise:
        model = with_normaliser(model, statistics)
    params, static = eqx.partition(model, parameters(model))
    opt_state = optimiser.init(params)
    if split is not None:
        everywhere = jax.sharding.NamedSharding(
            split.mesh, jax.sharding.PartitionSpec()
        )
        params, opt_state, episodes = jax.device_put(
            (params, opt_state, episodes), everywhere
        )
    chunk = min(steps, 100)
    losses = []
    with tqdm(total=steps, disable=not progress, desc="fit") as bar:
        done = 0
        while done < steps:
            size = min(chunk, steps - done)
            key, chunk_key = jr.split(key)
            params, opt_state, chunk_losses = _train_chunk(
                params, static, opt_state, episodes, statistics.scale, chunk_key,
                optimiser=optimiser, size=size, batch_size=batch_size, split=split,
            )  # fmt: skip
            losses.append(chunk_losses)
            done += size
            bar.update(size)
    return eqx.combine(params, static), jnp.concatenate(losses)


@eqx.filter_jit
def _train_chunk(
    params, static, opt_state, episodes, scale, key, *, optimiser, size, batch_size,
    split,
):  # fmt: skip
    def train_step(carry, step_key):
        params, opt_state = carry
        index = jr.randint(step_key, (batch_size,), 0, len(episodes))
        batch = jax.tree.map(lambda x: x[index], episodes)
        if split is not None:
            # Each device computes the loss of its part of the batch; XLA adds the
            # parts of the gradient across devices.
            batch = jax.lax.with_sharding_constraint(batch, split)
        model, opt_state, value = update(
            eqx.combine(params, static), opt_state, batch,
            optimiser=optimiser, scale=scale,
        )  # fmt: skip
        return (eqx.filter(model, parameters(model)), opt_state), value

    (params, opt_state), losses = jax.lax.scan(
        train_step, (params, opt_state), jr.split(key, size)
    )
    return params, opt_state, losses


def _batch_sharding(
    devices: Sequence[Any], batch_size: int
) -> jax.sharding.NamedSharding:
    devices = list(devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(
            f"devices must be a non-empty sequence of jax.Device (such as "
            f"jax.devices()), got {devices!r}."
        )
    if batch_size % len(devices):
        raise ValueError(
            f"batch_size must be a multiple of the number of devices to split it "
            f"over evenly, got batch_size={batch_size} for {len(devices)} devices."
        )
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
