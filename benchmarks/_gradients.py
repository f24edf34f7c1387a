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
    text: str, rule: str, passed: bool | None, numbers: str, if_failed: str
) -> dict:
    """A paper claim, the rule that decides it (fixed in the code before the run),
    its outcome (None: the scale run cannot decide it) and the numbers it was
    decided on."""
    return {
        "claim": text,
        "rule": rule,
        "passed": None if passed is None else bool(passed),
        "numbers": numbers,
        "if_failed": if_failed,
    }


def verdict(c: dict) -> str:
    return {True: "PASS", False: "FAIL", None: "NOT DECIDED"}[c["passed"]]


def claim_lines(claims: Sequence[dict]) -> list[str]:
    return [f"{verdict(c)}: {c['claim']} [{c['rule']}] {c['numbers']}" for c in claims]


SECTIONS = (
    ("accuracy", "Experiment 1: gradient accuracy against the horizon (ICLR Fig. 2)"),
    ("bounce", "Experiment 2: a non-differentiable contact, one_bounce (arXiv Fig. 3)"),
    ("chaos", "Experiment 3: chaos, double_pendulum (arXiv Fig. 4)"),
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
                    f"  Disagrees with the paper. Likely reason: {c['if_failed']}"
                )
        notes = data.get("notes", [])
        if notes:
            lines += ["", *notes]
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
