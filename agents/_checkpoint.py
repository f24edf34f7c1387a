"""Checkpoints of a BPO run: the complete `TrainState` and the metrics so far,
written atomically and checked before they are used."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

FORMAT = "diffpolicy-bpo-checkpoint-1"
FILENAME = "checkpoint.eqx"


class CheckpointError(ValueError):
    """A checkpoint that is corrupted, truncated, or from another run."""


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _save_leaf(f: Any, x: Any) -> None:
    # Typed PRNG keys are stored as their raw data.
    if _is_key(x):
        np.save(f, np.asarray(jax.random.key_data(x)))
    else:
        eqx.default_serialise_filter_spec(f, x)


def _load_leaf(f: Any, x: Any) -> Any:
    if _is_key(x):
        return jax.random.wrap_key_data(np.load(f))
    return eqx.default_deserialise_filter_spec(f, x)


def fingerprint(bpo: Any, settings: dict[str, Any]) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the task (its class, horizon and
    constants), the model's structure, the agent's settings and the run's."""
    env = bpo.env
    arrays = [np.asarray(x) for x in jax.tree.leaves(env) if eqx.is_array(x)]
    constants = hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
    model = bpo.model
    model_structure = "simulator"
    if model is not None:
        shapes = [
            (tuple(x.shape), str(x.dtype))
            for x in jax.tree.leaves(model)
            if eqx.is_array(x)
        ]
        model_structure = f"{type(model).__name__} {jax.tree.structure(model)} {shapes}"
    agent = {
        name: getattr(bpo, name)
        for name in (
            "model_every", "policy_every", "model_batch", "policy_batch",
            "buffer_size", "warmup_steps", "warmup_actions", "eval_every",
            "full_gradient", "gradient_diagnostics", "policy_width", "policy_depth",
        )
    }  # fmt: skip
    agent["activation"] = getattr(
        bpo.policy_activation, "__name__", repr(bpo.policy_activation)
    )
    agent["hyper"] = [np.asarray(x).tolist() for x in jax.tree.leaves(bpo.hyper)]
    return {
        "task": f"{env.name} horizon={env.horizon} {type(env).__name__} {constants}",
        "model": hashlib.sha256(model_structure.encode()).hexdigest(),
        "settings": json.dumps(agent, sort_keys=True),
        "run": json.dumps(settings, sort_keys=True),
    }


def save_checkpoint(
    directory: str | Path,
    bpo: Any,
    state: Any,
    chunks: list[dict[str, np.ndarray]],
    done: int,
    settings: dict[str, Any],
    wall_time: float = 0.0,
) -> Path:
    """Write the run's state after `done` chunks to `directory/checkpoint.eqx`,
    through a temporary file renamed over the old one (a crash leaves the previous
    checkpoint whole)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_bytes = io.BytesIO()
    eqx.tree_serialise_leaves(state_bytes, state, filter_spec=_save_leaf)
    metrics_bytes = io.BytesIO()
    flat = {
        f"{i}/{name}": value for i, c in enumerate(chunks) for name, value in c.items()
    }
    np.savez(metrics_bytes, **flat)
    payload = state_bytes.getvalue() + metrics_bytes.getvalue()
    header = {
        "format": FORMAT,
        "done": done,
        "wall_time": wall_time,
        "chunks": len(chunks),
        "state_bytes": len(state_bytes.getvalue()),
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "fingerprint": fingerprint(bpo, settings),
    }
    path = directory / FILENAME
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    directory: str | Path, bpo: Any, template: Any, settings: dict[str, Any]
) -> tuple[Any, list[dict[str, np.ndarray]], int]:
    """The state, the chunks' metrics, the number of chunks done and the seconds of
    training so far of the checkpoint in `directory`; `(None, [], 0, 0.0)` if there
    is none yet.

    Raises:
        CheckpointError: if the file is corrupted or truncated, or was written by a
            run with another task, model or settings.
    """
    path = Path(directory) / FILENAME
    if not path.exists():
        return None, [], 0, 0.0
    raw = path.read_bytes()
    line, _, payload = raw.partition(b"\n")
    try:
        header = json.loads(line)
        if header.get("format") != FORMAT:
            raise ValueError
    except (ValueError, AttributeError):
        raise CheckpointError(
            f"{path} is not a BPO checkpoint (unreadable header); delete it or "
            f"choose another run folder."
        ) from None
    if len(payload) != header["payload_bytes"]:
        raise CheckpointError(
            f"{path} is truncated: {len(payload)} bytes of payload, expected "
            f"{header['payload_bytes']}."
        )
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its checksum does not match.")
    expected = fingerprint(bpo, settings)
    for field, value in expected.items():
        if header["fingerprint"].get(field) != value:
            raise CheckpointError(
                f"{path} was written by a run with another {field} "
                f"({header['fingerprint'].get(field)!r}, this run: {value!r}); "
                f"resume it with the same task, model and settings."
            )
    split = header["state_bytes"]
    state = eqx.tree_deserialise_leaves(
        io.BytesIO(payload[:split]), template, filter_spec=_load_leaf
    )
    metrics = np.load(io.BytesIO(payload[split:]))
    chunks: list[dict[str, np.ndarray]] = [{} for _ in range(header["chunks"])]
    for name in metrics.files:
        index, key = name.split("/", 1)
        chunks[int(index)][key] = metrics[name]
    return state, chunks, header["done"], float(header.get("wall_time", 0.0))
