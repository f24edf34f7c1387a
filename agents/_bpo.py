"""BPO, Algorithm 1 of Ma et al. (2024): policy optimisation by backpropagation
through the simulator or a world model learned alongside."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray, Scalar

import diffenvs
import worldmodels

from ._buffer import ReplayBuffer
from ._objective import batch_objective
from ._policy import TanhGaussianPolicy

# The published settings (arXiv §5.2 and App. C; METHOD §3), where they differ from
# the laptop defaults of `BPO`.
PAPER: dict[str, Any] = dict(
    model_every=2, policy_every=16, model_batch=64, policy_batch=16,
    model_learning_rate=1e-3, policy_learning_rate=1e-4, max_grad_norm=100.0,
    entropy_coefficient=0.01, buffer_size=1_000_000, warmup_steps=1500,
)  # fmt: skip


class Hyperparameters(eqx.Module):
    """The numeric settings, as array leaves: a sweep over them is a `jax.vmap`."""

    model_learning_rate: Array
    policy_learning_rate: Array
    max_grad_norm: Array
    entropy_coefficient: Array


class TrainState(eqx.Module):
    """The complete state of a BPO run; a checkpoint is this pytree.

    Attributes:
        policy: the current policy (its normaliser included).
        model: the current world model, `None` through the simulator.
        policy_opt: the policy's Adam state.
        model_opt: the model's Adam state (`None` through the simulator).
        buffer: the replay buffer of episodes.
        hyper: the numeric settings.
        key: the PRNG key of what comes next.
        env_steps: environment steps taken so far.
        fitted: whether the normalisers have been fitted (at the end of warm-up).
        skipped: non-finite updates skipped so far, `[model, policy]`.
        dropped: collected episodes with a non-finite state, not stored.
    """

    policy: TanhGaussianPolicy
    model: Any
    policy_opt: optax.OptState
    model_opt: optax.OptState
    buffer: ReplayBuffer
    hyper: Hyperparameters
    key: PRNGKeyArray
    env_steps: Array
    fitted: Array
    skipped: Array
    dropped: Array


def _as_float(value: Any, name: str) -> Array:
    array = jnp.asarray(value, dtype=float)
    if array.ndim == 0 and not bool(jnp.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {name}={value!r}.")
    if array.ndim == 0 and float(array) < 0:
        raise ValueError(f"{name} must be non-negative, got {name}={value!r}.")
    return array


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")
    return int(value)


def _due(before: Array, after: Array, start: int, every: int) -> Array:
    """How many multiples of `every` environment steps past `start` lie in
    (before, after]: the updates due after an episode."""
    done = lambda t: jnp.maximum(t - start, 0) // every  # noqa: E731
    return done(after) - done(before)


def _finite(tree: Any) -> Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if eqx.is_inexact_array(x)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _select(keep_new: Array, new: Any, old: Any) -> Any:
    return jax.tree.map(
        lambda n, o: jnp.where(keep_new, n, o) if eqx.is_array(n) else n, new, old
    )


def _adam(learning_rate: Array, max_grad_norm: Array) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate)
    )


class BPO(eqx.Module):
    """Backpropagation-based policy optimisation, Algorithm 1 (arXiv §3, App. C).

    Repeat: collect one episode of the stochastic policy in the real task and store
    it; every `model_every` environment steps, one gradient step of the world model
    on `model_batch` stored episodes; every `policy_every` environment steps, one
    gradient step of the policy on J(θ), the imagined return through the model from
    `policy_batch` stored initial states (`agents.objective`). The first
    `warmup_steps` environment steps only collect. Through the simulator
    (`model=None`) there are no model steps.

    Every setting is a keyword argument; the defaults finish on a laptop CPU, and
    `BPO.paper(env, model)` holds the published values (an accelerator setting).

    Args:
        env: the task.
        model: a world model (`worldmodels.make(...)`, or any `eqx.Module` with
            `predict(s1, actions)`), trained alongside; `None` to differentiate
            through the simulator itself.
        model_every: environment steps per model update (the papers: 2).
        policy_every: environment steps per policy update (the papers: 16).
        model_batch: episodes per model update (the papers: 64).
        policy_batch: imagined episodes per policy update (the papers: 16).
        model_learning_rate: Adam's learning rate for the model (1e-3).
        policy_learning_rate: Adam's learning rate for the policy (1e-4).
        max_grad_norm: both gradients are clipped to this global norm (100).
        entropy_coefficient: α of the maximum-entropy bonus (swept over 0.1,
            0.01, 0.001 in the papers).
        buffer_size: environment steps the replay buffer holds (the papers: 1e6).
        warmup_steps: environment steps collected before any update (1500).
        warmup_actions: `"uniform"`, i.i.d. uniform actions (the papers' text), or
            `"policy"`, the untrained stochastic policy (their released code).
        eval_every: environment steps between evaluations of the deterministic
            policy; one compiled chunk of training covers this many.
        full_gradient: differentiate without the stop-gradient on the policy input
            (the papers' ablation, arXiv App. F.1).
        gradient_diagnostics: at every policy update, also compute the simulator's
            policy gradient at the same parameters and record its cosine similarity
            and relative error to the model's.
        policy_width, policy_depth, policy_activation: the policy MLP (2 × 64 ReLU).
    """

    env: diffenvs.AbstractEnv
    model: Any
    hyper: Hyperparameters
    model_every: int = eqx.field(static=True)
    policy_every: int = eqx.field(static=True)
    model_batch: int = eqx.field(static=True)
    policy_batch: int = eqx.field(static=True)
    buffer_size: int = eqx.field(static=True)
    warmup_steps: int = eqx.field(static=True)
    warmup_actions: str = eqx.field(static=True)
    eval_every: int = eqx.field(static=True)
    full_gradient: bool = eqx.field(static=True)
    gradient_diagnostics: bool = eqx.field(static=True)
    policy_width: int = eqx.field(static=True)
    policy_depth: int = eqx.field(static=True)
    policy_activation: Callable[[Array], Array] = eqx.field(static=True)
    references: tuple[float, float] = eqx.field(static=True)

    def __init__(
        self,
        env: diffenvs.AbstractEnv,
        model: Any = None,
        *,
        model_every: int = 2,
        policy_every: int = 16,
        model_batch: int = 16,
        policy_batch: int = 16,
        model_learning_rate: float | Array = 1e-3,
        policy_learning_rate: float | Array = 1e-3,
        max_grad_norm: float | Array = 100.0,
        entropy_coefficient: float | Array = 0.01,
        buffer_size: int = 100_000,
        warmup_steps: int = 500,
        warmup_actions: Literal["uniform", "policy"] = "uniform",
        eval_every: int = 2_000,
        full_gradient: bool = False,
        gradient_diagnostics: bool = True,
        policy_width: int = 64,
        policy_depth: int = 2,
        policy_activation: Callable[[Array], Array] = jax.nn.relu,
    ):
        if not isinstance(env, diffenvs.AbstractEnv):
            raise TypeError(
                f"env must be a diffenvs task (diffenvs.make(...)), got {env!r}."
            )
        if model is not None and not callable(getattr(model, "predict", None)):
            raise TypeError(
                f"model must be None (the simulator) or implement predict(s1, "
                f"actions) -> states, got {type(model).__name__}."
            )
        if model is not None:
            _check_model(model, env)
        if warmup_actions not in ("uniform", "policy"):
            raise ValueError(
                f"warmup_actions must be 'uniform' or 'policy', got {warmup_actions!r}."
            )
        if (
            isinstance(warmup_steps, bool)
            or not isinstance(warmup_steps, int)
            or warmup_steps < 0
        ):
            raise ValueError(
                f"warmup_steps must be a non-negative int, got "
                f"warmup_steps={warmup_steps!r}."
            )
        self.env = env
        self.model = model
        self.hyper = Hyperparameters(
            _as_float(model_learning_rate, "model_learning_rate"),
            _as_float(policy_learning_rate, "policy_learning_rate"),
            _as_float(max_grad_norm, "max_grad_norm"),
            _as_float(entropy_coefficient, "entropy_coefficient"),
        )
        self.model_every = _positive_int(model_every, "model_every")
        self.policy_every = _positive_int(policy_every, "policy_every")
        self.model_batch = _positive_int(model_batch, "model_batch")
        self.policy_batch = _positive_int(policy_batch, "policy_batch")
        self.buffer_size = _positive_int(buffer_size, "buffer_size")
        self.warmup_steps = warmup_steps
        self.warmup_actions = warmup_actions
        self.eval_every = _positive_int(eval_every, "eval_every")
        self.full_gradient = bool(full_gradient)
        self.gradient_diagnostics = bool(gradient_diagnostics) and model is not None
        self.policy_width = _positive_int(policy_width, "policy_width")
        self.policy_depth = _positive_int(policy_depth, "policy_depth")
        self.policy_activation = policy_activation
        refs = env.references()
        self.references = (float(refs.random), float(refs.optimal))

    @classmethod
    def paper(cls, env: diffenvs.AbstractEnv, model: Any = None, **overrides) -> BPO:
        """The published settings (arXiv §5.2 and App. C; METHOD §3): update ratios
        2 and 16, batches 64 and 16, learning rates 1e-3 and 1e-4, clipping at 100,
        a buffer of 1e6 steps and 1500 warm-up steps. Run them for 200 000
        environment steps (100 000 on the double pendulum): an accelerator setting."""
        return cls(env, model, **{**PAPER, **overrides})

    # ---- sizes -----------------------------------------------------------------

    @property
    def horizon(self) -> int:
        return self.env.horizon

    @property
    def episodes_per_chunk(self) -> int:
        """Episodes in one compiled chunk: `eval_every` steps, rounded up."""
        return max(1, math.ceil(self.eval_every / self.horizon))

    @property
    def capacity(self) -> int:
        """Episodes the replay buffer holds."""
        return max(1, self.buffer_size // self.horizon)

    @property
    def policy_slots(self) -> int:
        """The most policy updates one episode can trigger."""
        return -(-self.horizon // self.policy_every) + 1

    # ---- the pure training functions -----------------------------------------

    def init(self, key: PRNGKeyArray) -> TrainState:
        """The state before training: a fresh policy, the untrained model, empty
        buffer. Pure; `jax.vmap` over keys for several seeds."""
        policy_key, key = jr.split(key)
        env = self.env
        policy = TanhGaussianPolicy(
            env.state_dim, env.action_dim, width=self.policy_width,
            depth=self.policy_depth, activation=self.policy_activation, key=policy_key,
        )  # fmt: skip
        hyper = self.hyper
        policy_opt = _adam(hyper.policy_learning_rate, hyper.max_grad_norm).init(
            eqx.filter(policy, eqx.is_inexact_array)
        )
        model_opt = None
        if self.model is not None:
            model_opt = _adam(hyper.model_learning_rate, hyper.max_grad_norm).init(
                eqx.filter(self.model, worldmodels.parameters(self.model))
            )
        dtype = env.initial_state().dtype
        buffer = ReplayBuffer.empty(
            self.capacity, self.horizon, env.state_dim, env.action_dim, dtype
        )
        zero = jnp.zeros((), jnp.int32)
        return TrainState(
            policy, self.model, policy_opt, model_opt, buffer, hyper, key, zero,
            jnp.array(False), jnp.zeros(2, jnp.int32), zero,
        )  # fmt: skip

    def chunk(self, state: TrainState) -> tuple[TrainState, dict[str, Array]]:
        """`episodes_per_chunk` episodes of Algorithm 1, then one evaluation of the
        deterministic policy. Pure; `jax.vmap` over states for several seeds.

        Returns:
            The new state and the chunk's metrics: per episode (`env_steps`,
            `train_return`, `model_loss`, `model_updates`), per policy-update slot
            of each episode (`imagined_return`, `grad_norm`, `entropy`,
            `cosine_similarity`, `relative_error`, `model_loss_at_update`,
            `update_valid`, `update_env_steps`), and the evaluation (`eval_return`,
            `normalized_score`, `eval_env_steps`). Through the simulator there are
            no model metrics (`model_loss`, `model_updates`,
            `model_loss_at_update`), and without `gradient_diagnostics` no
            `cosine_similarity` and `relative_error`.
        """
        arrays, static = eqx.partition(state, eqx.is_array)

        def episode(arrays, _):
            new, metrics = self._episode(eqx.combine(arrays, static))
            return eqx.filter(new, eqx.is_array), metrics

        arrays, metrics = jax.lax.scan(
            episode, arrays, None, length=self.episodes_per_chunk
        )
        state = eqx.combine(arrays, static)
        eval_return = self.evaluate(state.policy)
        random, optimal = self.references
        metrics["eval_return"] = eval_return
        metrics["normalized_score"] = (eval_return - random) / (optimal - random)
        metrics["eval_env_steps"] = state.env_steps
        return state, metrics

    def train(self, key: PRNGKeyArray, env_steps: int, **options) -> Any:
        """Run Algorithm 1 for `env_steps` environment steps (rounded up to whole
        chunks of `eval_every`), compiled chunk by chunk.

        Args:
            key: a PRNG key; the same key gives the same result.
            env_steps: the budget of environment steps.
            seeds: run this many seeds from `key`, vmapped in one program; every
                array of the result then has a leading seed axis.
            progress: show a progress bar with the latest evaluation.
            devices: shard the seeds over these devices (`jax.sharding`).
            checkpoint: a folder; the complete training state is written there
                every `checkpoint_every` chunks and at the end.
            checkpoint_every: chunks between checkpoints.
            resume: continue from the checkpoint in `checkpoint` if there is one.
            callback: called as `callback(chunks_done, metrics)` after each chunk.

        Returns:
            An `agents.Result`: the policy, the model, the metrics, the state.
        """
        from ._train import train

        return train(self, key, env_steps, **options)

    def evaluate(self, policy: TanhGaussianPolicy) -> Scalar:
        """The return of the deterministic policy tanh(μ) on the real task."""
        env = self.env
        s1 = env.initial_state()
        trajectory = diffenvs.closed_loop(
            diffenvs.Dynamics(env), policy, s1, jr.key(0), self.horizon
        )
        return jnp.sum(
            env.rewards_from_states(s1, trajectory.actions, trajectory.states)
        )

    def _episode(self, state: TrainState) -> tuple[TrainState, dict[str, Array]]:
        env, horizon = self.env, self.horizon
        key, collect_key, model_key, policy_key = jr.split(state.key, 4)
        warm = state.env_steps < self.warmup_steps

        # Collect one episode in the real task.
        def explore(seen, step_key):
            action = state.policy.act(seen, step_key)
            if self.warmup_actions == "uniform":
                uniform = jr.uniform(step_key, action.shape, action.dtype, -1.0, 1.0)
                action = jnp.where(warm, uniform, action)
            return action

        s1 = env.initial_state()
        trajectory = diffenvs.closed_loop(
            diffenvs.Dynamics(env), explore, s1, collect_key, horizon
        )
        trajectory = jax.lax.stop_gradient(trajectory)
        train_return = jnp.sum(
            env.rewards_from_states(s1, trajectory.actions, trajectory.states)
        )
        collected = _finite(trajectory.states)
        buffer = state.buffer.add(s1, trajectory.actions, trajectory.states, collected)
        before, after = state.env_steps, state.env_steps + horizon

        # Fit the normalisers once, when warm-up is over, and keep them: refitting
        # would change what the trained weights see.
        fit_now = (~state.fitted) & (after >= self.warmup_steps)
        # Computed only in the episode that fits (a pass over the whole buffer).
        statistics = jax.lax.cond(
            fit_now,
            lambda: buffer.normaliser(),
            lambda: worldmodels.Normaliser.identity(env.state_dim),
        )
        policy = _select(
            fit_now, worldmodels.with_normaliser(state.policy, statistics), state.policy
        )
        model = state.model
        if model is not None:
            model = _select(
                fit_now, worldmodels.with_normaliser(model, statistics), model
            )
        state = eqx.tree_at(
            lambda s: (s.policy, s.model, s.buffer, s.fitted, s.env_steps, s.dropped),
            state,
            (policy, model, buffer, state.fitted | fit_now, after,
             state.dropped + (~collected).astype(jnp.int32)),
            is_leaf=lambda x: x is None,
        )  # fmt: skip

        start = self.warmup_steps
        state, model_loss, model_updates = self._model_updates(
            state, model_key, _due(before, after, start, self.model_every)
        )
        policy_due = _due(before, after, start, self.policy_every)
        state, policy_metrics = self._policy_updates(state, policy_key, policy_due)
        # The environment step at which each update slot fell due.
        slot = jnp.arange(self.policy_slots)
        first = jnp.maximum(before - start, 0) // self.policy_every + 1 + slot
        policy_metrics["update_env_steps"] = start + first * self.policy_every
        policy_metrics["update_valid"] = slot < policy_due
        if state.model is not None:
            policy_metrics["model_loss_at_update"] = jnp.broadcast_to(
                model_loss, slot.shape
            )
        metrics = dict(env_steps=after, train_return=train_return, **policy_metrics)
        if state.model is not None:
            metrics.update(model_loss=model_loss, model_updates=model_updates)
        return eqx.tree_at(lambda s: s.key, state, key), metrics

    def _model_updates(self, state: TrainState, key, count):
        """`count` model updates; returns the state, the mean loss and the count."""
        if state.model is None:
            return state, jnp.zeros(()), jnp.zeros((), jnp.int32)
        optimiser = _adam(state.hyper.model_learning_rate, state.hyper.max_grad_norm)
        scale = _normaliser_scale(state.model)

        def body(i, carry):
            model, opt, skipped, total = carry
            batch = state.buffer.sample(jr.fold_in(key, i), self.model_batch)
            new_model, new_opt, loss = worldmodels.update(
                model, opt, batch, optimiser=optimiser, scale=scale
            )
            ok = jnp.isfinite(loss) & _finite(new_model)
            model = _select(ok, new_model, model)
            opt = _select(ok, new_opt, opt)
            return model, opt, skipped + (~ok), total + jnp.where(ok, loss, 0.0)

        zero = jnp.zeros((), jnp.int32)
        init = (state.model, state.model_opt, zero, jnp.zeros(()))
        model, opt, skipped, total = _fori_loop(count, body, init)
        mean_loss = total / jnp.maximum(count - skipped, 1)
        state = eqx.tree_at(
            lambda s: (s.model, s.model_opt, s.skipped),
            state,
            (model, opt, state.skipped.at[0].add(skipped)),
        )
        return state, mean_loss, count

    def _policy_updates(self, state: TrainState, key, count):
        """`count` policy updates, each recording its diagnostics in a slot."""
        env = self.env
        hyper = state.hyper
        optimiser = _adam(hyper.policy_learning_rate, hyper.max_grad_norm)
        through = env if state.model is None else state.model

        def objective(policy, model, s1, keys):
            return batch_objective(
                policy, model, env, s1, keys,
                entropy_coefficient=hyper.entropy_coefficient,
                full_gradient=self.full_gradient,
            )  # fmt: skip

        def gradient(policy, model, s1, keys):
            params, static = eqx.partition(policy, eqx.is_inexact_array)
            fn = lambda p: objective(eqx.combine(p, static), model, s1, keys)  # noqa: E731
            (value, imagined), grads = jax.value_and_grad(fn, has_aux=True)(params)
            return value, imagined, grads

        slots = self.policy_slots
        zeros = jnp.zeros(slots)
        names = ("imagined_return", "grad_norm", "entropy")
        if self.gradient_diagnostics:
            names += ("cosine_similarity", "relative_error")

        def body(i, carry):
            policy, opt, skipped, records = carry
            sample_key, noise_key = jr.split(jr.fold_in(key, i))
            s1 = state.buffer.sample(sample_key, self.policy_batch).s1
            keys = jr.split(noise_key, self.policy_batch)
            _, imagined, grads = gradient(policy, through, s1, keys)
            norm = optax.tree.norm(grads)
            values = (imagined.episode_return, norm, imagined.entropy)
            if self.gradient_diagnostics:
                _, _, true = gradient(policy, env, s1, keys)
                values += _compare(grads, true)
            # Ascent on J: Optax minimises, so the update follows -∇J.
            params = eqx.filter(policy, eqx.is_inexact_array)
            updates, new_opt = optimiser.update(
                jax.tree.map(jnp.negative, grads), opt, params
            )
            new_policy = eqx.apply_updates(policy, updates)
            ok = (
                jnp.isfinite(norm)
                & jnp.isfinite(imagined.episode_return)
                & _finite(new_policy)
            )
            policy = _select(ok, new_policy, policy)
            opt = _select(ok, new_opt, opt)
            records = {
                name: records[name].at[i].set(value)
                for name, value in zip(names, values, strict=True)
            }
            return policy, opt, skipped + (~ok), records

        init = (state.policy, state.policy_opt, jnp.zeros((), jnp.int32),
                {name: zeros for name in names})  # fmt: skip
        policy, opt, skipped, records = _fori_loop(count, body, init)
        state = eqx.tree_at(
            lambda s: (s.policy, s.policy_opt, s.skipped),
            state,
            (policy, opt, state.skipped.at[1].add(skipped)),
        )
        return state, records


def _check_model(model: Any, env: diffenvs.AbstractEnv) -> None:
    """Trace `model.predict` on one episode of `env` (shapes only, nothing runs),
    so that a model built for another task fails here, not inside training."""
    s1 = jax.ShapeDtypeStruct((env.state_dim,), env.initial_state().dtype)
    actions = jax.ShapeDtypeStruct((env.horizon, env.action_dim), s1.dtype)
    try:
        states = eqx.filter_eval_shape(
            lambda m, s, a: m.predict(s, a), model, s1, actions
        )
    except Exception as error:
        raise ValueError(
            f"model.predict fails on an episode of task {env.name!r} (s1 of shape "
            f"{s1.shape}, actions of shape {actions.shape}): {error}"
        ) from error
    expected = (env.horizon, env.state_dim)
    if getattr(states, "shape", None) != expected:
        raise ValueError(
            f"model.predict must return states of shape (horizon, state_dim) = "
            f"{expected} for task {env.name!r}, got "
            f"{getattr(states, 'shape', type(states).__name__)}."
        )


def _fori_loop(count: Array, body: Callable, init: Any) -> Any:
    """`jax.lax.fori_loop` from 0 to a traced `count`, over a carry that may hold
    non-array leaves (a policy's activation function)."""
    arrays, static = eqx.partition(init, eqx.is_array)

    def step(i, arrays):
        out = body(i, eqx.combine(arrays, static))
        return eqx.filter(out, eqx.is_array)

    return eqx.combine(jax.lax.fori_loop(0, count, step, arrays), static)


def _normaliser_scale(model: Any) -> Array | None:
    """The scale of the first `Normaliser` in the model (the loss divides by it),
    or `None` for a model without one."""
    found = [
        node
        for node in jax.tree.leaves(
            model, is_leaf=lambda x: isinstance(x, worldmodels.Normaliser)
        )
        if isinstance(node, worldmodels.Normaliser)
    ]
    return found[0].scale if found else None


def _compare(grads: Any, true: Any) -> tuple[Scalar, Scalar]:
    """Cosine similarity and relative error ‖g - g*‖ / ‖g*‖ of two gradients."""
    g = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(grads)])
    t = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(true)])
    tiny = jnp.finfo(g.dtype).tiny
    cosine = jnp.dot(g, t) / jnp.maximum(jnp.linalg.norm(g) * jnp.linalg.norm(t), tiny)
    error = jnp.linalg.norm(g - t) / jnp.maximum(jnp.linalg.norm(t), tiny)
    return cosine, error
