"""A tour of one task: `python -m diffenvs [--task NAME] [--horizon H]`; and
`python -m diffenvs references [--tasks ...] [--horizons ...]`, which regenerates
the shipped reference table (`diffenvs/_data/references.json`).

The tour builds the task, looks up (or computes) its reference returns, scores a
constant action sequence, differentiates the return through the simulator, and
improves the sequence by projected gradient ascent.
"""

import argparse
import sys
from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

import diffenvs

from ._references import TABLE_HORIZONS, write_table


@eqx.filter_jit
def _value_and_grad(env, actions):
    return jax.value_and_grad(env.episode_return)(actions)


def references(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffenvs references",
        description=(
            "Recompute reference returns (random and optimal) and write them into "
            "the table shipped with diffenvs; entries not recomputed are kept."
        ),
    )
    parser.add_argument("--tasks", nargs="+", default=list(diffenvs.CONTROL_TASKS))
    parser.add_argument("--horizons", nargs="+", type=int, default=TABLE_HORIZONS)
    args = parser.parse_args(argv)

    def envs():
        for name in args.tasks:
            for horizon in args.horizons:
                # Only the construction in float64: a `yield` inside the context
                # would keep it entered while the entry is computed.
                with jax.enable_x64(True):
                    env = diffenvs.make(name, horizon=horizon)
                yield env

    write_table(envs(), report=lambda line: print(line, flush=True))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["references"]:
        references(argv[1:])
        return
    parser = argparse.ArgumentParser(description="A tour of one diffenvs task.")
    parser.add_argument("--task", default="timber", choices=diffenvs.names())
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300, help="gradient steps")
    args = parser.parse_args(argv)

    env = diffenvs.make(args.task, horizon=args.horizon)
    print(f"task {env.name}: horizon {env.horizon}, dt {env.dt:.4g}, ")
    print(f"  state_dim {env.state_dim}, action_dim {env.action_dim}")
    refs = env.references()
    print(f"reference returns: random {refs.random:.6g}, optimal {refs.optimal:.6g}")

    actions = jnp.zeros((env.horizon, env.action_dim))
    value, grad = _value_and_grad(env, actions)
    print(
        f"constant action 0: return {float(value):.6g}, normalised score "
        f"{float(env.normalized_score(value)):.3f}"
    )
    print(
        f"  gradient of the return w.r.t. the actions: norm "
        f"{float(jnp.linalg.norm(grad)):.4g}, first steps "
        f"{jnp.ravel(grad[:3]).round(4).tolist()}"
    )

    optimiser = optax.adam(0.05)

    @eqx.filter_jit
    def ascend(actions, opt_state):
        value, grad = _value_and_grad(env, actions)
        updates, opt_state = optimiser.update(-grad, opt_state)
        actions = jnp.clip(cast(Array, optax.apply_updates(actions, updates)), -1, 1)
        return actions, opt_state, value

    opt_state = optimiser.init(actions)
    for _ in range(args.steps):
        actions, opt_state, value = ascend(actions, opt_state)
    value = env.episode_return(actions)
    print(
        f"after {args.steps} steps of gradient ascent: return {float(value):.6g}, "
        f"normalised score {float(env.normalized_score(value)):.3f}"
    )


if __name__ == "__main__":
    main()
