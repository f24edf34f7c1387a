"""Helpers of `test_gradients.py`: the papers' gradient experiments (ICLR Fig. 2,
arXiv Figs. 3 and 4), their scales, the model cache, the claim rules and the
Markdown summary.

Everything here uses the packages' public API only.

Scales (environment variable `GRADIENTS_SCALE`):

* `tiny`: seconds; for developing the code, its numbers mean nothing.
* `default`: fits in about 40 minutes on a 2-core CPU: few seeds, few training
  steps, a subset of horizons.
* `full`: the papers' scale (10 seeds, 100 000 transitions, 20 000 model steps for
  Fig. 2; 100 000 transitions and 1000 steps for Figs. 3 and 4).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.flatten_util import ravel_pytree

import agents
import diffenvs
import worldmodels

SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "accuracy": dict(
            horizons=(10, 30), seeds=1, transitions=600, steps=10, batch=8
        ),
        "bounce": dict(horizon=20, transitions=400, steps=10, batch=8, points=21),
        "chaos": dict(
            horizon=20, transitions=400, steps=10, batch=8, sequences=4, points=21
        ),
        "bounds": dict(seeds=1),
    },
    "default": {
        "accuracy": dict(
            horizons=(10, 50, 200), seeds=2, transitions=20_000, steps=300, batch=32
        ),
        "bounce": dict(
            horizon=20, transitions=20_000, steps=1000, batch=64, points=201
        ),
        "chaos": dict(
            horizon=100,
            transitions=20_000,
            steps=500,
            batch=32,
            sequences=50,
            points=201,
        ),
        "bounds": dict(seeds=2),
    },
    "full": {
        "accuracy": dict(
            horizons=(10, 20, 50, 100, 200, 500),
            seeds=10,
            transitions=100_000,
            steps=20_000,
            batch=64,
        ),
        "bounce": dict(
            horizon=20, transitions=100_000, steps=1000, batch=64, points=201
        ),
        "chaos": dict(
            horizon=100,
            transitions=100_000,
            steps=1000,
            batch=64,
            sequences=50,
            points=201,
        ),
        "bounds": dict(seeds=2),
    },
}

ACTION_NOISE = 0.1  # ICLR App. F.1: a_t = π_b(s_t) + N(0, 0.1)
PINNED_LOG_STD = -5.0  # the policy's smallest log σ: π_b is deterministic up to e^-5


def scale_name() -> str:
    """The scale chosen by `GRADIENTS_SCALE` (default `default`)."""
    name = os.environ.get("GRADIENTS_SCALE", "default")
    if name not in SCALES:
        raise ValueError(
            f"GRADIENTS_SCALE must be one of {sorted(SCALES)}, got {name!r}"
        )
    return name


# ---- the model cache ---------------------------------------------------------------


def trained_model(
    cache_dir: Path,
    name: str,
    env: diffenvs.AbstractEnv,
    episodes: Callable[[], worldmodels.Episodes],
    settings: dict[str, Any],
    key: jax.Array,
) -> tuple[Any, dict[str, Any]]:
    """The model `name` trained on `episodes()` by `worldmodels.fit`, loaded from
    `cache_dir` when one with the same settings was trained before.

    `settings` must determine the training completely (task, horizon, data, seed,
    steps, batch); the file name is a hash of them and of the model's name.
    Returns the model and its record (settings, fit seconds, final loss).
    """
    settings = {**settings, "model": name, "task": env.name, "horizon": env.horizon}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    path = cache_dir / f"{name}-{digest[:16]}.eqx"
    record_path = path.with_suffix(".json")
    init_key, fit_key = jr.split(key)
    model = worldmodels.make(name, env, key=init_key)
    if path.exists() and record_path.exists():
        record = json.loads(record_path.read_text())
        return eqx.tree_deserialise_leaves(path, model), {**record, "cached": True}
    data = episodes()
    start = time.perf_counter()
    model, losses = worldmodels.fit(
        model, data, key=fit_key, steps=settings["steps"], batch_size=settings["batch"]
    )
    losses = np.asarray(jax.block_until_ready(losses))
    seconds = time.perf_counter() - start
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"{name}: non-finite training loss")
    cache_dir.mkdir(parents=True, exist_ok=True)
    eqx.tree_serialise_leaves(path, model)
    record = {
        "settings": settings,
        "fit_seconds": seconds,
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
    }
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return model, {**record, "cached": False}


# ---- experiment 1: gradient accuracy against the horizon (ICLR Fig. 2) ------------


def behaviour_policy(
    env: diffenvs.AbstractEnv, key: jax.Array
) -> agents.TanhGaussianPolicy:
    """A randomly initialised policy π_b whose standard deviation is pinned at its
    smallest value e^-5 (the log-σ head's weights zero, its bias far negative), so
    that its samples are tanh(μ(o)) up to noise of 0.007: the 'random deterministic
    policy' of ICLR App. F.1, in the form `agents.objective` takes."""
    policy = agents.TanhGaussianPolicy(env.state_dim, env.action_dim, key=key)
    last = policy.mlp.layers[-1]
    m = env.action_dim
    weight = last.weight.at[m:].set(0.0)
    bias = last.bias.at[m:].set(-20.0)
    policy = eqx.tree_at(
        lambda p: (p.mlp.layers[-1].weight, p.mlp.layers[-1].bias),
        policy,
        (weight, bias),
    )
    log_std = policy.distribution(jnp.zeros(env.state_dim + 1))[1]
    assert np.allclose(log_std, PINNED_LOG_STD), log_std
    return policy


def behaviour_episodes(
    env: diffenvs.AbstractEnv,
    policy: agents.TanhGaussianPolicy,
    count: int,
    key: jax.Array,
) -> worldmodels.Episodes:
    """`count` episodes of a_t = π_b(s_t) + N(0, 0.1), clipped to [-1, 1]."""

    def noisy(observation, step_key):
        return policy(observation) + ACTION_NOISE * jr.normal(
            step_key, (env.action_dim,)
        )

    rollouts = jax.jit(jax.vmap(lambda k: env.rollout(noisy, k)))(jr.split(key, count))
    s1 = jnp.broadcast_to(env.initial_state(), (count, env.state_dim))
    return worldmodels.Episodes(s1, rollouts.actions, rollouts.states)


@eqx.filter_jit
def policy_gradient(policy, model, env, key) -> jax.Array:
    """∇_θ J(π_b) through `model` (the task itself for the simulator's gradient),
    by `agents.objective` without entropy bonus, flattened over the policy MLP's
    parameters (the normaliser is not trained)."""

    def value(mlp):
        return agents.objective(
            eqx.tree_at(lambda p: p.mlp, policy, mlp),
            model,
            env,
            env.initial_state(),
            key,
        )[0]

    grads = eqx.filter_grad(value)(policy.mlp)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_array))
    return jnp.concatenate([jnp.ravel(x) for x in leaves])


def cosine(u: jax.Array, v: jax.Array) -> float:
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


# ---- experiments 2 and 3: landscapes and gradient norms -------------------------


def uniform_episodes(env: diffenvs.AbstractEnv, count: int, key: jax.Array):
    """`count` episodes of i.i.d. uniform actions on [-1, 1] (arXiv App. D)."""
    actions = jr.uniform(
        key, (count, env.horizon, env.action_dim), minval=-1.0, maxval=1.0
    )
    return worldmodels.Episodes.from_env(env, actions)


@eqx.filter_jit
def first_action_returns(model, env, first_actions: jax.Array) -> jax.Array:
    """The return predicted by `model` (the task's reward on its states) for each
    first action, every later action 0."""

    def one(a0):
        actions = jnp.zeros((env.horizon, env.action_dim)).at[0, 0].set(a0)
        states = model.predict(env.initial_state(), actions)
        return jnp.sum(env.rewards_from_states(env.initial_state(), actions, states))

    return jax.vmap(one)(first_actions)


@eqx.filter_jit
def first_action_gradient_norms(model, env, actions: jax.Array, steps: jax.Array):
    """‖∂ŝ_H/∂a_0‖ for each H in `steps` (ŝ_H is row H - 1 of `predict`) and each
    action sequence of `actions` (sequences, horizon, action_dim); reverse mode,
    which every model supports. Shape (sequences, len(steps))."""

    def one(a):
        jac = jax.jacrev(lambda x: model.predict(env.initial_state(), x)[steps - 1])(a)
        return jnp.linalg.norm(jac[:, :, 0, :], axis=(1, 2))

    return jax.lax.map(one, actions)


def local_maxima(values: Sequence[float]) -> int:
    """The number of strict local maxima of a curve sampled on a grid (ends
    excluded): a count of the landscape's bumps."""
    v = np.asarray(values)
    return int(np.sum((v[1:-1] > v[:-2]) & (v[1:-1] > v[2:])))


def log_linear_fit(
    horizons: Sequence[float], values: Sequence[float]
) -> tuple[float, float]:
    """Slope (per step, in log10) and R² of log10(values) fitted linearly in H."""
    x, y = np.asarray(horizons, float), np.log10(np.asarray(values, float))
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = np.sum((y - y.mean()) ** 2)
    return float(slope), float(1.0 - np.sum(residual**2) / total) if total > 0 else 0.0


# ---- claims and the summary --------------------------------------------------------


def claim(
    text: str,
    rule: str,
    passed: bool | None,
    numbers: str,
    if_failed: str,
    against: str = "the paper",
) -> dict:
    """A paper claim, the rule that decides it (fixed in the code before the run),
    its outcome (None: the scale run cannot decide it) and the numbers it was
    decided on; `against` names the source of the claim (the paper, or
    docs/theory.md for a bound)."""
    return {
        "claim": text,
        "rule": rule,
        "passed": None if passed is None else bool(passed),
        "numbers": numbers,
        "if_failed": if_failed,
        "against": against,
    }


def verdict(c: dict) -> str:
    return {True: "PASS", False: "FAIL", None: "NOT DECIDED"}[c["passed"]]


def claim_lines(claims: Sequence[dict]) -> list[str]:
    return [f"{verdict(c)}: {c['claim']} [{c['rule']}] {c['numbers']}" for c in claims]


SECTIONS = (
    ("accuracy", "Experiment 1: gradient accuracy against the horizon (ICLR Fig. 2)"),
    ("bounce", "Experiment 2: a non-differentiable contact, one_bounce (arXiv Fig. 3)"),
    ("chaos", "Experiment 3: chaos, double_pendulum (arXiv Fig. 4)"),
    ("bounds", "Experiment 4: the bounds of docs/theory.md on the trained models"),
)


def render_summary(results_dir: Path) -> Path:
    """Write `gradients.md` from the experiments' JSON files under `results_dir`
    (each experiment's section is kept from its last run)."""
    lines = [
        "# Gradient experiments (benchmarks/test_gradients.py)",
        "",
        "Generated by `python -m pytest benchmarks --benchmark -k gradients`,",
        "at the scale set by `GRADIENTS_SCALE` (`tiny`, `default`, `full`). Each claim",
        "is decided by a rule fixed in the code before the run; a failed claim is a",
        "result, not a failed test.",
        "",
    ]
    for name, title in SECTIONS:
        path = results_dir / f"gradients_{name}.json"
        if not path.exists():
            lines += [f"## {title}", "", "Not run.", ""]
            continue
        data = json.loads(path.read_text())
        lines += [f"## {title}", ""]
        lines += [
            f"Scale: **{data['scale']}** ({_settings_text(data['settings'])}); "
            f"run time {data['seconds'] / 60:.1f} min"
            f" ({data['fit_seconds'] / 60:.1f} min of it training,"
            f" {data['cached_models']} of {data['models']} models from the cache).",
            "",
        ]
        if "full_estimate_hours" in data:
            hours = data["full_estimate_hours"]
            duration = (
                f"{hours:.0f} hours" if hours >= 10 else f"{hours * 60:.0f} minutes"
            )
            lines += [
                f"Estimated training time at the `full` scale: about {duration} on "
                f"this machine ({data['full_estimate_basis']}).",
                "",
            ]
        lines += data["table"] + [""]
        lines += [f"![{name}](gradients_{name}.png)", "", "Claims:", ""]
        for c in data["claims"]:
            lines.append(
                f"* **{verdict(c)}** {c['claim']} Rule: {c['rule']}. {c['numbers']}"
            )
            if c["passed"] is None:
                lines.append("  This scale's horizons cannot decide it.")
            elif not c["passed"]:
                lines.append(
                    f"  Disagrees with {c.get('against', 'the paper')}. "
                    f"Likely reason: {c['if_failed']}"
                )
        for note in data.get("notes", []):
            lines += ["", note]  # one paragraph per note
        lines.append("")
    path = results_dir / "gradients.md"
    path.write_text("\n".join(lines))
    return path


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return out


# ---- experiment 4: the bounds of docs/theory.md on the trained models -----------

# Relative slack of every checked upper bound. The measurements are float32 (the
# models are trained and cached in float32): a Jacobian of `predict` by reverse
# mode against local Jacobians of `teacher_forced` or `step`, two code paths each
# exact to a few float32 ulp (1e-7) per operation over at most a few hundred
# operations. 1e-3 is far above that and far below a real violation.
BOUND_RTOL = 1e-3
STATE_READERS = ("markov", "hwm-lstm", "hwm-transformer")
RECURRENT_AWMS = ("awm-lstm", "awm-rnn")


def accuracy_setting(horizon: int, seed: int, cfg: dict[str, Any]):
    """Experiment 1's task, π_b, data, cache settings and keys for one horizon and
    seed, exactly as `test_gradients_accuracy` builds them (the same cache keys)."""
    env = diffenvs.make("credit_assignment", horizon=horizon)
    count = max(cfg["transitions"] // horizon, cfg["batch"])
    policy_key, data_key, model_key, noise_key = jr.split(jr.key(seed), 4)
    policy = behaviour_policy(env, policy_key)

    def data():
        return behaviour_episodes(env, policy, count, data_key)

    settings = dict(
        experiment="accuracy",
        seed=seed,
        episodes=count,
        steps=cfg["steps"],
        batch=cfg["batch"],
        noise=0.1,
    )
    return env, policy, data, settings, model_key, noise_key


def chaos_setting(cfg: dict[str, Any]):
    """Experiment 3's task, data, cache settings and model key, exactly as
    `test_gradients_chaos` builds them (the same cache keys)."""
    env = diffenvs.make("double_pendulum", horizon=cfg["horizon"])
    data_key, model_key, _ = jr.split(jr.key(0), 3)
    count = cfg["transitions"] // env.horizon

    def data():
        return uniform_episodes(env, count, data_key)

    settings = dict(
        experiment="chaos", episodes=count, steps=cfg["steps"], batch=cfg["batch"]
    )
    return env, data, settings, model_key


# Cotangents per vmapped batch in `reverse_jacobian`. Under `jax.jit` on CPU
# (JAX 0.10.2), `jax.jacrev` of the parallel transformer (`teacher_forced` of
# hwm-transformer, `predict` of awm-transformer), which vmaps the VJP over all
# H × state cotangents at once, returned wrong Jacobians once the batch reached
# about 96 (off by up to 0.28 absolute at H = 50, with either attention class),
# while the same VJP unjitted, or jitted in batches of up to 80, agreed with
# finite differences. Small batches avoid it; the consistency checks of
# `analyse_bounds` would show it again.
JACOBIAN_BATCH = 4


def reverse_jacobian(f, x: jax.Array) -> jax.Array:
    """The Jacobian of `f` at the array `x`, `f(x).shape + x.shape`, by reverse
    mode, `JACOBIAN_BATCH` cotangents at a time (`jax.lax.map`)."""
    out, vjp = jax.vjp(f, x)
    size = out.size
    basis = jnp.eye(size, dtype=out.dtype).reshape((size, *out.shape))
    rows = jax.lax.map(lambda c: vjp(c)[0], basis, batch_size=JACOBIAN_BATCH)
    return rows.reshape(out.shape + x.shape)


def _flat(tree) -> jax.Array:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    return jnp.concatenate([jnp.ravel(x) for x in leaves])


def _with_mlp(policy, mlp):
    return eqx.tree_at(lambda p: p.mlp, policy, mlp)


@eqx.filter_jit
def bpo_episode(policy, model, env, key):
    """The episode `agents.objective` differentiates: generated step by step
    through `worldmodels.incremental(model)` by `policy.act` with the per-step
    keys of `key`, the actions re-evaluated from the observations with the same
    noise. Returns the observations, the actions, the Jacobian of `predict` with
    respect to the actions, `(H, state, H, action)` (reverse mode), and the terms
    of Thm. 2: the part of ∇θ J that passes through the model, Σ_j ∂R/∂ŝ_j
    Σ_i ∂ŝ_j/∂a_i ∂a_i/∂θ (the reward's own dependence on the actions held
    fixed), the rest (`direct`), the norms ‖∂R/∂ŝ_j‖ (R the return) and the
    spectral norms ‖∂a_i/∂θ‖ over the policy MLP's parameters."""
    s1 = env.initial_state()
    stepper = worldmodels.incremental(model, env.action_dim)
    trajectory = diffenvs.closed_loop(stepper, policy.act, s1, key, env.horizon)
    observations = jax.lax.stop_gradient(trajectory.observations)
    keys = diffenvs.step_keys(key, env.horizon)

    def actions_of(mlp):
        return jax.vmap(lambda o, k: _with_mlp(policy, mlp).sample(o, k)[0])(
            observations, keys
        )

    actions = actions_of(policy.mlp)
    states = model.predict(s1, actions)
    jacobian = reverse_jacobian(lambda a: model.predict(s1, a), actions)

    def through_model(mlp):
        a = actions_of(mlp)
        rewards = env.rewards_from_states(
            s1, jax.lax.stop_gradient(a), model.predict(s1, a)
        )
        return jnp.sum(rewards)

    def direct(mlp):
        a = actions_of(mlp)
        rewards = env.rewards_from_states(
            s1, a, jax.lax.stop_gradient(model.predict(s1, a))
        )
        return jnp.sum(rewards)

    g_model = _flat(eqx.filter_grad(through_model)(policy.mlp))
    g_direct = _flat(eqx.filter_grad(direct)(policy.mlp))
    d_return = jax.grad(lambda s: jnp.sum(env.rewards_from_states(s1, actions, s)))(
        states
    )
    params, static = eqx.partition(policy.mlp, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)
    d_actions = reverse_jacobian(
        lambda p: actions_of(eqx.combine(unravel(p), static)), flat
    )  # (H, action, parameters)
    return dict(
        observations=observations,
        actions=actions,
        states=states,
        jacobian=jacobian,
        g_model=g_model,
        g_direct=g_direct,
        reward_norms=jnp.linalg.norm(d_return, axis=-1),
        policy_norms=jnp.linalg.norm(d_actions, ord=2, axis=(-2, -1)),
    )


@eqx.filter_jit
def teacher_forced_jacobians(model, s1, actions, states):
    """`teacher_forced` at the model's own predictions ŝ = `states` and its
    Jacobians there with respect to the states, `(H, n, H, n)`, and the actions,
    `(H, n, H, m)`: the local Jacobians ∂h_t/∂ŝ_i and ∂h_t/∂a_k of Thm. 1 along
    the trajectory (reverse mode, `reverse_jacobian`)."""
    forced = model.teacher_forced(s1, actions, states)
    d_states = reverse_jacobian(lambda s: model.teacher_forced(s1, actions, s), states)
    d_actions = reverse_jacobian(lambda a: model.teacher_forced(s1, a, states), actions)
    return forced, d_states, d_actions


def _top_output(backbone_carry):
    """The output row of a stacked recurrent backbone from its carry: the hidden
    state h of the last layer (an LSTM layer's carry is (h, c))."""
    last = backbone_carry[-1]
    return last[0] if isinstance(last, tuple) else last


@eqx.filter_jit
def recurrent_jacobians(model, s1, actions):
    """For a recurrent AWM x_{j} = F_j(x_{j-1}, a_j), ŝ_j = O(x_j), with x the
    backbone's carry (all layers' states, flattened) and F_j the model's public
    `step`: the per-step Jacobians ∂F_j/∂x, `(H, d, d)`, and ∂F_j/∂a, `(H, d, m)`,
    at the carries the model visits on `actions`; the readout Jacobian ∂O/∂x,
    `(n, d)` (O is affine); the states `step` predicts and O at the visited
    carries (equal, a check of the readout)."""
    carry0 = model.init(s1, actions.shape[0])
    x0, unravel = ravel_pytree(carry0.backbone)

    def body(carry, action):
        new, state = model.step(carry, action)
        return new, (carry, new.backbone, state)

    _, (carries, after, states) = jax.lax.scan(body, carry0, actions)

    def transition(carry, x, a):
        new, _ = model.step(eqx.tree_at(lambda c: c.backbone, carry, unravel(x)), a)
        return ravel_pytree(new.backbone)[0]

    def per_step(carry, a):
        x = ravel_pytree(carry.backbone)[0]
        return jax.jacfwd(transition, argnums=(1, 2))(carry, x, a)

    d_x, d_a = jax.vmap(per_step)(carries, actions)
    z1 = model.normaliser.normalise(s1)

    def readout(x):
        return model.normaliser.denormalise(z1 + model.head(_top_output(unravel(x))))

    d_out = jax.jacfwd(readout)(x0)
    read = jax.vmap(lambda b: readout(ravel_pytree(b)[0]))(after)
    return d_x, d_a, d_out, states, read


def block_norms(jacobian) -> np.ndarray:
    """`[j, i]`: the spectral norm of the block d states[j] / d actions[i] of a
    Jacobian `(H, n, H, m)`, in float64."""
    blocks = np.asarray(jacobian, np.float64).transpose(0, 2, 1, 3)
    return np.linalg.norm(blocks, ord=2, axis=(-2, -1))


def lags(horizon: int) -> np.ndarray:
    """`[j, i]`: j - i, the recurrent steps between action row i and state row j
    (t - k - 1 in the paper's indexing); negative above the diagonal."""
    index = np.arange(horizon)
    return index[:, None] - index[None, :]


def recursion_bound(state_norms: np.ndarray, action_norms: np.ndarray) -> np.ndarray:
    """Thm. 1's (*) with the measured local norms: B[j, i] = ‖∂h_j/∂a_i‖ +
    Σ_{l<j} ‖∂h_j/∂ŝ_l‖ B[l, i]."""
    bound = np.zeros_like(action_norms)
    for j in range(action_norms.shape[0]):
        bound[j] = action_norms[j] + state_norms[j, :j] @ bound[:j]
    return bound


def chain_rule_history(d_states: np.ndarray, d_actions: np.ndarray) -> np.ndarray:
    """dŝ_j/da = ∂h_j/∂a + Σ_{l<j} ∂h_j/∂ŝ_l dŝ_l/da from the local Jacobians."""
    total = np.zeros_like(d_actions)
    for j in range(d_actions.shape[0]):
        total[j] = d_actions[j] + np.einsum(
            "nls,lsim->nim", d_states[j, :, :j], total[:j]
        )
    return total


def chain_rule_recurrent(d_x: np.ndarray, d_a: np.ndarray, d_out: np.ndarray):
    """∂ŝ_j/∂a_i = O ∂F_j/∂x ⋯ ∂F_{i+1}/∂x ∂F_i/∂a from the per-step Jacobians,
    `(H, n, H, m)`."""
    horizon, d, m = d_a.shape
    carry = np.zeros((horizon, d, m))  # ∂x_j/∂a_i for every i, updated over j
    out = np.zeros((horizon, d_out.shape[0], horizon, m))
    for j in range(horizon):
        carry[:j] = np.einsum("de,ief->idf", d_x[j], carry[:j])
        carry[j] = d_a[j]
        out[j] = np.einsum("nd,idm->nim", d_out, carry)
    return out


def ratio_max(observed: np.ndarray, bound: np.ndarray) -> float:
    """The largest observed/bound over entries (0/0 counts as 0; x/0 as inf)."""
    observed, bound = np.broadcast_arrays(observed, bound)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(observed == 0, 0.0, observed / bound)
    return float(np.max(r)) if r.size else 0.0


def per_lag_max(matrix: np.ndarray) -> list[float]:
    """Max over the pairs (j, j - d) of `matrix[j, j - d]`, for d = 0 ... H - 1."""
    horizon = matrix.shape[0]
    return [float(np.max(np.diagonal(matrix, -d))) for d in range(horizon)]


def analyse_bounds(name: str, model, env, policy, key) -> dict[str, Any]:
    """Every measured norm and bound of experiment 4 for one trained model on the
    closed-loop episode of `policy` (`bpo_episode`), in float64 NumPy from the
    float32 measurements. Returns per-bound ratios, per-lag maxima and row sums."""
    ep = {k: np.asarray(v) for k, v in bpo_episode(policy, model, env, key).items()}
    horizon = env.horizon
    s1 = env.initial_state()
    norms = block_norms(ep["jacobian"])
    lag = lags(horizon)
    causal = lag >= 0
    assert np.all(np.isfinite(norms)), f"{name}: non-finite Jacobian"
    l_r = float(ep["reward_norms"].max())
    l_pi = float(ep["policy_norms"].max())
    g_model = float(np.linalg.norm(ep["g_model"].astype(np.float64)))
    thm2 = l_r * l_pi * float(norms[causal].sum())
    out: dict[str, Any] = {
        "norms": norms,
        "row_sums": norms.sum(axis=1),
        "per_lag": per_lag_max(norms),
        "acausal_max": float(np.max(norms[~causal], initial=0.0)),
        "L_r": l_r,
        "L_pi": l_pi,
        "gradient_through_model": g_model,
        "gradient_direct": float(np.linalg.norm(ep["g_direct"].astype(np.float64))),
        "thm2_bound": thm2,
        "ratios": {"thm2": g_model / thm2 if thm2 > 0 else float(g_model > 0)},
        "bounds": {},
        "consistency": {},
    }
    gradient = np.asarray(
        policy_gradient(policy, model, env, key), np.float64
    )  # experiment 1's ∇θ J (agents.objective)
    split = ep["g_model"].astype(np.float64) + ep["g_direct"].astype(np.float64)
    out["consistency"]["objective_gradient"] = float(
        np.linalg.norm(split - gradient) / max(np.linalg.norm(gradient), 1e-30)
    )
    jac = ep["jacobian"].astype(np.float64)
    scale = max(np.abs(jac).max(), 1e-30)
    if name in STATE_READERS:
        forced, d_states, d_actions = (
            np.asarray(x, np.float64)
            for x in teacher_forced_jacobians(
                model, s1, jnp.asarray(ep["actions"]), jnp.asarray(ep["states"])
            )
        )
        out["consistency"]["teacher_forced"] = float(
            np.abs(forced - ep["states"]).max() / max(np.abs(ep["states"]).max(), 1e-30)
        )
        out["consistency"]["chain_rule"] = float(
            np.abs(chain_rule_history(d_states, d_actions) - jac).max() / scale
        )
        state_norms, action_norms = block_norms(d_states), block_norms(d_actions)
        l_s, l_a = float(state_norms.max()), float(action_norms.max())
        markov = name == "markov"
        base = l_s if markov else 1.0 + l_s
        d = np.maximum(lag, 0)
        with np.errstate(over="ignore"):
            closed = np.where(causal, l_a * base ** d.astype(float), 0.0)
            printed = np.where(causal, l_a + l_s ** (d + 1.0), 0.0)
        recursion = recursion_bound(state_norms, action_norms)
        out.update(L_s=l_s, L_a=l_a, base=base)
        out["bounds"] = {"recursion": recursion, "closed_form": closed}
        out["comparison"] = {"printed": printed}
    elif name in RECURRENT_AWMS:
        d_x, d_a, d_out, states, read = (
            np.asarray(x, np.float64)
            for x in recurrent_jacobians(model, s1, jnp.asarray(ep["actions"]))
        )
        top = max(np.abs(states).max(), 1e-30)
        out["consistency"]["readout"] = float(np.abs(read - states).max() / top)
        out["consistency"]["step_vs_predict"] = float(
            np.abs(states - ep["states"]).max() / top
        )
        out["consistency"]["chain_rule"] = float(
            np.abs(chain_rule_recurrent(d_x, d_a, d_out) - jac).max() / scale
        )
        step_norms = np.linalg.norm(d_x, ord=2, axis=(-2, -1))
        input_norms = np.linalg.norm(d_a, ord=2, axis=(-2, -1))
        readout = float(np.linalg.norm(d_out, ord=2))
        eta, l_fa = float(step_norms.max()), float(input_norms.max())
        d = np.maximum(lag, 0)
        with np.errstate(over="ignore"):
            cor21 = np.where(causal, readout * l_fa * eta ** d.astype(float), 0.0)
        # The tighter chain-rule product with the per-step norms of the pair:
        # ‖O‖ ‖∂F_i/∂a‖ Π_{l=i+1}^{j} ‖∂F_l/∂x‖.
        logs = np.concatenate([[0.0], np.cumsum(np.log(step_norms))])
        with np.errstate(over="ignore"):
            product = np.where(
                causal,
                readout
                * input_norms[None, :]
                * np.exp(logs[1:][:, None] - logs[1:][None, :]),
                0.0,
            )
        out.update(eta=eta, L_Fa=l_fa, readout_norm=readout)
        out["step_norms"] = step_norms.tolist()
        out["bounds"] = {"cor21": cor21, "product": product}
    for bound_name, bound in out["bounds"].items():
        out["ratios"][bound_name] = ratio_max(norms[causal], bound[causal])
    for bound_name, bound in out.get("comparison", {}).items():
        out["ratios"][bound_name] = ratio_max(norms[causal], bound[causal])
    return out


def late_over_early(row_sums: Sequence[float]) -> float:
    """The largest row sum at t ≥ H/2 over the largest at t < H/4."""
    r = np.asarray(row_sums)
    horizon = len(r)
    return float(r[horizon // 2 :].max() / r[: max(1, horizon // 4)].max())
