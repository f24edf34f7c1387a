"""The host loop around BPO's compiled chunks: seeds, progress, checkpoints."""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray
from tqdm.auto import tqdm

from ._bpo import BPO, TrainState
from ._checkpoint import load_checkpoint, save_checkpoint
from ._policy import TanhGaussianPolicy

# Metrics recorded once per policy-update slot; flattened to one row per update.
UPDATE_METRICS = (
    "imagined_return", "grad_norm", "entropy", "cosine_similarity", "relative_error",
    "model_loss_at_update", "update_env_steps",
)  # fmt: skip
EPISODE_METRICS = ("env_steps", "train_return", "model_loss", "model_updates")
EVAL_METRICS = ("eval_env_steps", "eval_return", "normalized_score")


class Result(eqx.Module):
    """What `BPO.train` returns.

    Attributes:
        policy: the trained policy; called as `policy(observation)` it is the
            deterministic policy tanh(μ), usable with `env.rollout`. With several
            seeds, every array has a leading seed axis.
        model: the trained world model (`None` through the simulator).
        metrics: NumPy arrays over training (a leading seed axis with seeds):
            per episode `env_steps`, `train_return`, `model_loss` and
            `model_updates` (with a model);
            per policy update `imagined_return`, `grad_norm` (before clipping),
            `entropy`, `cosine_similarity` and `relative_error` (to the simulator's
            gradient; with a model and `gradient_diagnostics`),
            `model_loss_at_update` (with a model), `update_env_steps`; per evaluation
            `eval_env_steps`, `eval_return`, `normalized_score`; and the counts
            `skipped_model_updates`, `skipped_policy_updates`, `dropped_episodes`.
        state: the final `TrainState`, from which training can continue.
        wall_time: seconds of training, compilation included, summed over the
            sessions of a resumed run.
    """

    policy: TanhGaussianPolicy
    model: Any
    metrics: dict[str, np.ndarray]
    state: TrainState
    wall_time: float = eqx.field(static=True)


@eqx.filter_jit
def _init(bpo: BPO, keys: PRNGKeyArray) -> TrainState:
    return eqx.filter_vmap(bpo.init)(keys)


@eqx.filter_jit
def _chunk(bpo: BPO, state: TrainState):
    # The step count and the fitted flag are the same for every seed. Passed
    # unbatched, the update counts they decide stay unbatched, so the update loops
    # do not become batched while-loops that select between old and new carries
    # on every iteration.
    def one(state, env_steps, fitted):
        state = eqx.tree_at(
            lambda s: (s.env_steps, s.fitted), state, (env_steps, fitted)
        )
        return bpo.chunk(state)

    shared = (state.env_steps[0], state.fitted[0])
    return eqx.filter_vmap(one, in_axes=(eqx.if_array(0), None, None))(state, *shared)


def _seed_keys(key: PRNGKeyArray, seeds: int | None) -> PRNGKeyArray:
    if not isinstance(key, jax.Array) or not jnp.issubdtype(
        key.dtype, jax.dtypes.prng_key
    ):
        raise TypeError(
            f"key must be a PRNG key such as jax.random.key(0), got {key!r}; a "
            f"legacy jax.random.PRNGKey converts with jax.random.wrap_key_data."
        )
    if seeds is None:
        if key.shape != ():
            raise ValueError(
                f"key must be a single PRNG key (shape ()), got shape {key.shape}; "
                f"pass seeds=n for n seeds from one key."
            )
        return key[None]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds <= 0:
        raise ValueError(f"seeds must be a positive int, got seeds={seeds!r}.")
    return jr.split(key, seeds)


def _shard(tree: Any, devices: Sequence[jax.Device] | None, seeds: int) -> Any:
    if devices is None:
        return tree
    devices = list(devices)
    if seeds % len(devices):
        raise ValueError(
            f"seeds must be a multiple of the number of devices, got seeds={seeds} "
            f"for {len(devices)} devices."
        )
    mesh = jax.sharding.Mesh(np.array(devices), ("seed",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed"))
    return jax.tree.map(
        lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree
    )


def collate(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The chunks' metrics (each with a leading seed axis) joined along training."""
    if not chunks:
        return {}
    out: dict[str, np.ndarray] = {}
    for name in (n for n in EPISODE_METRICS if n in chunks[0]):
        out[name] = np.concatenate([c[name] for c in chunks], axis=1)
    for name in EVAL_METRICS:
        out[name] = np.stack([c[name] for c in chunks], axis=1)
    # Every seed takes its updates at the same steps, so seed 0's mask serves all.
    valid = np.concatenate([c["update_valid"][0].reshape(-1) for c in chunks])
    for name in (n for n in UPDATE_METRICS if n in chunks[0]):
        rows = np.concatenate(
            [c[name].reshape(c[name].shape[0], -1) for c in chunks], axis=1
        )
        out[name] = rows[:, valid]
    return out


def train(
    bpo: BPO,
    key: PRNGKeyArray,
    env_steps: int,
    *,
    seeds: int | None = None,
    progress: bool = False,
    devices: Sequence[jax.Device] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    callback: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> Result:
    """See `BPO.train`."""
    env_steps = int(env_steps) if isinstance(env_steps, int | np.integer) else env_steps
    if isinstance(env_steps, bool) or not isinstance(env_steps, int) or env_steps <= 0:
        raise ValueError(f"env_steps must be a positive int, got {env_steps!r}.")
    keys = _seed_keys(key, seeds)
    count = keys.shape[0]
    per_chunk = bpo.episodes_per_chunk * bpo.horizon
    total_chunks = math.ceil(env_steps / per_chunk)
    key_data = np.asarray(jr.key_data(keys))
    settings = dict(
        seeds=count,
        env_steps=total_chunks * per_chunk,
        key=hashlib.sha256(key_data.tobytes()).hexdigest(),
    )

    chunks: list[dict[str, np.ndarray]] = []
    done, previous = 0, 0.0
    # The fresh state is also the template a checkpoint is read into.
    state = _init(bpo, keys)
    if checkpoint is not None and resume:
        loaded, chunks, done, previous = load_checkpoint(
            checkpoint, bpo, state, settings
        )
        state = state if loaded is None else loaded
    state = _shard(state, devices, count)

    start = time.perf_counter()
    with tqdm(
        total=total_chunks * per_chunk, initial=done * per_chunk, disable=not progress,
        desc=f"bpo {bpo.env.name} H={bpo.horizon}", unit="step",
    ) as bar:  # fmt: skip
        while done < total_chunks:
            state, metrics = _chunk(bpo, state)
            metrics = jax.tree.map(np.asarray, metrics)
            chunks.append(metrics)
            done += 1
            bar.update(per_chunk)
            bar.set_postfix(
                ret=f"{np.mean(metrics['eval_return']):.4g}",
                score=f"{np.mean(metrics['normalized_score']):.3f}",
            )
            if callback is not None:
                callback(done, metrics)
            if checkpoint is not None and (
                done % checkpoint_every == 0 or done == total_chunks
            ):
                wall = previous + time.perf_counter() - start
                save_checkpoint(checkpoint, bpo, state, chunks, done, settings, wall)
    wall = previous + time.perf_counter() - start

    out = collate(chunks)
    out["skipped_model_updates"] = np.asarray(state.skipped[:, 0])
    out["skipped_policy_updates"] = np.asarray(state.skipped[:, 1])
    out["dropped_episodes"] = np.asarray(state.dropped)
    skipped = int(np.sum(state.skipped)) + int(np.sum(state.dropped))
    if skipped:
        warnings.warn(
            f"BPO skipped {int(np.sum(state.skipped[:, 0]))} model and "
            f"{int(np.sum(state.skipped[:, 1]))} policy updates with non-finite "
            f"values and dropped {int(np.sum(state.dropped))} diverged episodes "
            f"(see result.metrics).",
            RuntimeWarning,
            stacklevel=3,
        )
    if seeds is None:
        state = jax.tree.map(lambda x: x[0] if eqx.is_array(x) else x, state)
        out = {name: value[0] for name, value in out.items()}
    return Result(state.policy, state.model, out, state, wall)
