"""Reference returns: a Monte-Carlo random baseline and trajectory optimisation.

`references(env)` looks the pair up in the table shipped with the package (written
by `write_table`, i.e. `python -m diffenvs references`, for the eight control tasks
at the standard horizons in their default configuration), else in the on-disk cache,
else computes it and writes it to the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import time
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray
from tqdm.auto import tqdm

if TYPE_CHECKING:
    # For annotations only: the tasks use this module, not the other way round.
    from ._env import AbstractEnv

TABLE_PATH = pathlib.Path(__file__).parent / "_data" / "references.json"
TABLE_HORIZONS = (10, 20, 50, 100, 200, 500, 1000)
# The settings the shipped table and the cache are computed with.
RANDOM_EPISODES = 4096
RANDOM_SEED = 0
OPTIMISER_STARTS = 16
OPTIMISER_STEPS = 3000
OPTIMISER_SEED = 0


class References(eqx.Module):
    """Reference returns of a task at one horizon.

    Attributes:
        random: R_rand(H), the mean return of i.i.d. uniform actions.
        optimal: R_opt(H), the best return over open-loop action sequences.
    """

    random: float
    optimal: float


_memory: dict[str, References] = {}


def _to_float64(env: AbstractEnv) -> AbstractEnv:
    """The task with float64 constants.

    A constant stored in float32 (the task was built without float64) is widened
    through its shortest decimal form, so 1.2 becomes 1.2 and not 1.2000000477: the
    references then do not depend on the precision the task was built in.
    """

    def widen(leaf):
        if not eqx.is_inexact_array(leaf):
            return leaf
        if leaf.dtype == jnp.float32:
            values = np.asarray(leaf)
            decimal = [float(str(value)) for value in values.ravel()]
            return jnp.asarray(np.reshape(decimal, values.shape), jnp.float64)
        return jnp.asarray(leaf, jnp.float64)

    return jax.tree.map(widen, env)


def random_return(
    env: AbstractEnv,
    *,
    num_episodes: int = RANDOM_EPISODES,
    key: PRNGKeyArray | None = None,
) -> float:
    """R_rand(H): the mean return of i.i.d. uniform actions in `[-1, 1]`.

    Args:
        env: the task.
        num_episodes: the number of Monte-Carlo episodes (at least 1000).
        key: a PRNG key; `jr.key(0)` if omitted, so the baseline is reproducible.

    Returns:
        The mean return, as a Python float, computed in float64.
    """
    if num_episodes < 1000:
        raise ValueError(
            f"num_episodes must be at least 1000 for a stable baseline, got "
            f"{num_episodes}."
        )
    key = jr.key(RANDOM_SEED) if key is None else key
    with jax.enable_x64(True):
        env = _to_float64(env)
        shape = (num_episodes, env.horizon, env.action_dim)
        actions = jr.uniform(key, shape, jnp.float64, -1.0, 1.0)
        returns = eqx.filter_jit(_batch_returns)(env, actions)
        return float(jnp.mean(returns))


def optimal_return(
    env: AbstractEnv,
    *,
    num_starts: int = OPTIMISER_STARTS,
    num_steps: int = OPTIMISER_STEPS,
    learning_rate: float = 0.05,
    key: PRNGKeyArray | None = None,
    progress: bool = False,
) -> tuple[float, Float[Array, "horizon action"]]:
    """R_opt(H): the best return over open-loop action sequences.

    Multi-start projected Adam through the differentiable simulator in float64: the
    actions are optimised directly and projected back onto the box `[-1, 1]` after
    every step. The starts are the three constant sequences -1, 0 and +1, the task's
    `reference_actions()` where it has one, and uniform random sequences for the
    rest. The step size follows a cosine decay to zero. The landscapes are
    non-convex; this finds the best of several local optima, not a certificate.

    Args:
        env: the task.
        num_starts: the number of starts (at least 4).
        num_steps: Adam steps per start.
        learning_rate: the initial step size, in action units.
        key: a PRNG key for the random starts; `jr.key(0)` if omitted.
        progress: show a progress bar.

    Returns:
        The best return found (a Python float) and its action sequence, shape
        `(horizon, action_dim)`.
    """
    if num_starts < 4:
        raise ValueError(f"num_starts must be at least 4, got {num_starts}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}.")
    key = jr.key(OPTIMISER_SEED) if key is None else key
    with jax.enable_x64(True):
        env = _to_float64(env)
        shape = (env.horizon, env.action_dim)
        starts = [-jnp.ones(shape), jnp.zeros(shape), jnp.ones(shape)]
        reference = env.reference_actions()
        if reference is not None:
            starts.append(jnp.asarray(reference, jnp.float64))
        random = jr.uniform(key, (num_starts - len(starts), *shape), jnp.float64, -1, 1)
        actions = jnp.concatenate([jnp.stack(starts), random])

        schedule = optax.cosine_decay_schedule(learning_rate, num_steps)
        optimiser = optax.adam(schedule)
        returns_of = jax.vmap(env.episode_return)

        def loss(actions):
            return -jnp.sum(returns_of(actions))

        chunk = min(num_steps, 250)

        @eqx.filter_jit
        def run_chunk(actions, opt_state, length):
            def body(carry, _):
                actions, opt_state = carry
                grads = jax.grad(loss)(actions)
                updates, opt_state = optimiser.update(grads, opt_state)
                actions = jnp.clip(
                    cast(Array, optax.apply_updates(actions, updates)), -1, 1
                )
                return (actions, opt_state), None

            (actions, opt_state), _ = jax.lax.scan(
                body, (actions, opt_state), None, length=length
            )
            return actions, opt_state, returns_of(actions)

        opt_state = optimiser.init(actions)
        initial = eqx.filter_jit(_batch_returns)(env, actions)
        best_index = int(jnp.argmax(initial))
        best_return, best_actions = float(initial[best_index]), actions[best_index]
        done = 0
        with tqdm(total=num_steps, disable=not progress, desc=env.name) as bar:
            while done < num_steps:
                length = min(chunk, num_steps - done)
                actions, opt_state, returns = run_chunk(actions, opt_state, length)
                done += length
                bar.update(length)
                index = int(jnp.argmax(returns))
                if float(returns[index]) > best_return:
                    best_return, best_actions = float(returns[index]), actions[index]
        if not np.isfinite(best_return):
            raise FloatingPointError(
                f"{env.name}: trajectory optimisation found no finite return at "
                f"horizon={env.horizon}."
            )
        return best_return, best_actions


def _batch_returns(env: AbstractEnv, actions: Array) -> Array:
    return jax.vmap(env.episode_return)(actions)


def fingerprint(env: AbstractEnv) -> str:
    """A short hash of a task's full configuration: its class, static fields
    (horizon, solver) and constants, the latter rounded to float32 so that the same
    task built with or without float64 has one fingerprint."""
    leaves, treedef = jax.tree.flatten(env)
    try:
        values = [np.asarray(leaf, np.float32).tolist() for leaf in leaves]
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            "references() needs a concrete task: call it outside jit."
        ) from None
    cls = type(env)
    text = f"{cls.__module__}.{cls.__qualname__}|{treedef}|{values}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir() -> pathlib.Path:
    """Where on-demand references are cached: `$DIFFENVS_CACHE_DIR`, else
    `$XDG_CACHE_HOME/diffenvs`, else `~/.cache/diffenvs`."""
    if "DIFFENVS_CACHE_DIR" in os.environ:
        return pathlib.Path(os.environ["DIFFENVS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "diffenvs"


def load_table() -> dict:
    """The shipped reference table: `{task: {horizon: entry}}` where each entry has
    `random`, `optimal` and the task's `fingerprint`."""
    if not TABLE_PATH.exists():
        return {}
    return json.loads(TABLE_PATH.read_text())["entries"]


def compute_references(env: AbstractEnv, *, progress: bool = False) -> dict:
    """Compute an entry of the reference table for `env`."""
    random = random_return(env)
    optimal, _ = optimal_return(env, progress=progress)
    # The random baseline can never beat the optimum; if it seems to, the optimiser
    # failed, and a normalised score would be meaningless.
    if optimal < random:
        raise RuntimeError(
            f"{env.name}: the optimiser's best return {optimal} is below the random "
            f"baseline {random} at horizon={env.horizon}."
        )
    return {
        "random": random,
        "optimal": optimal,
        "fingerprint": fingerprint(env),
        "random_episodes": RANDOM_EPISODES,
        "optimiser_starts": OPTIMISER_STARTS,
        "optimiser_steps": OPTIMISER_STEPS,
    }


def write_table(envs: Iterable[AbstractEnv], *, report=print) -> None:
    """Compute the entries of `envs` (tasks in their default configuration, built
    in float64) and write them into the shipped table, keeping its other entries.
    The table is written after every entry, so an interrupted run keeps its work."""
    table = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}
    entries = table.get("entries", {})
    for env in envs:
        start = time.perf_counter()
        entry = compute_references(env, progress=True)
        entries.setdefault(env.name, {})[str(env.horizon)] = entry
        report(
            f"{env.name:>15} H={env.horizon:<5} random={entry['random']:<14.8g} "
            f"optimal={entry['optimal']:<14.8g} "
            f"({time.perf_counter() - start:.1f}s)"
        )
        table = {
            "description": (
                "Reference returns of the diffenvs control tasks in their default "
                "configuration: 'random' is the mean return of i.i.d. uniform "
                "actions, 'optimal' the best return of multi-start trajectory "
                "optimisation through the simulator. Produced by "
                "python -m diffenvs references."
            ),
            "settings": {
                "random_episodes": RANDOM_EPISODES,
                "optimiser_starts": OPTIMISER_STARTS,
                "optimiser_steps": OPTIMISER_STEPS,
                "jax_version": jax.__version__,
            },
            "entries": {
                task: dict(sorted(rows.items(), key=lambda item: int(item[0])))
                for task, rows in entries.items()
            },
        }
        TABLE_PATH.parent.mkdir(parents=True, exist_ok=True)
        TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n")


def references(env: AbstractEnv) -> References:
    """See `AbstractEnv.references`."""
    key = fingerprint(env)
    if key in _memory:
        return _memory[key]
    entry = load_table().get(env.name, {}).get(str(env.horizon))
    if entry is None or entry["fingerprint"] != key:
        path = cache_dir() / f"{env.name}-{env.horizon}-{key}.json"
        entry = _read_cached(path)
        if entry is None:
            entry = compute_references(env, progress=True)
            _write_cached(path, entry)
    result = References(random=entry["random"], optimal=entry["optimal"])
    _memory[key] = result
    return result


def normalized_score(env: AbstractEnv, episode_return: ArrayLike) -> Array:
    """See `AbstractEnv.normalized_score`."""
    refs = references(env)
    return (jnp.asarray(episode_return) - refs.random) / (refs.optimal - refs.random)


def _read_cached(path: pathlib.Path) -> dict | None:
    """The cached entry, or `None` if there is none or it cannot be read (a
    truncated or foreign file is recomputed, with a warning)."""
    try:
        entry = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as error:
        warnings.warn(
            f"ignoring the unreadable reference cache {path} ({error}); recomputing.",
            stacklevel=3,
        )
        return None
    if not isinstance(entry, dict) or not {"random", "optimal"} <= entry.keys():
        warnings.warn(
            f"ignoring the malformed reference cache {path}; recomputing.",
            stacklevel=3,
        )
        return None
    return entry


def _write_cached(path: pathlib.Path, entry: dict) -> None:
    """Write atomically (a temporary file in the same folder, then a rename), so a
    concurrent process never reads half a file; a cache that cannot be written is
    a warning, never the loss of the computed result."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False
        ) as file:
            temporary = file.name
            file.write(json.dumps(entry, indent=1))
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        warnings.warn(
            f"could not write the reference cache {path} ({error}); the result is "
            f"kept in memory for this process. Set DIFFENVS_CACHE_DIR to a writable "
            f"folder to keep it.",
            stacklevel=3,
        )
