"""Compute the reference-return table shipped with `diffenvs`.

For each of the eight control tasks at each standard horizon, in the default
configuration: R_rand(H), the mean return of uniform random actions, and R_opt(H),
the best return found by multi-start trajectory optimisation through the simulator
(see `diffenvs.random_return` and `diffenvs.optimal_return` for the settings).

    python scripts/compute_references.py                 # the whole table
    python scripts/compute_references.py --tasks hiv --horizons 50 500

Entries computed now replace those in diffenvs/_data/references.json; the others
are kept.
"""

import argparse
import json
import time

import jax

import diffenvs
from diffenvs._references import (
    OPTIMISER_STARTS,
    OPTIMISER_STEPS,
    RANDOM_EPISODES,
    TABLE_HORIZONS,
    TABLE_PATH,
    compute_references,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(diffenvs.CONTROL_TASKS))
    parser.add_argument("--horizons", nargs="+", type=int, default=TABLE_HORIZONS)
    args = parser.parse_args()

    table = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}
    entries = table.get("entries", {})
    for name in args.tasks:
        for horizon in args.horizons:
            start = time.perf_counter()
            with jax.enable_x64(True):
                env = diffenvs.make(name, horizon=horizon)
            entry = compute_references(env, progress=True)
            entries.setdefault(name, {})[str(horizon)] = entry
            seconds = time.perf_counter() - start
            print(
                f"{name:>15} H={horizon:<5} random={entry['random']:<14.8g} "
                f"optimal={entry['optimal']:<14.8g} ({seconds:.1f}s)",
                flush=True,
            )
            # Written after every entry, so an interrupted run keeps its work.
            table = {
                "description": (
                    "Reference returns of the diffenvs control tasks in their default "
                    "configuration: 'random' is the mean return of i.i.d. uniform "
                    "actions, 'optimal' the best return of multi-start trajectory "
                    "optimisation through the simulator. Produced by "
                    "scripts/compute_references.py."
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


if __name__ == "__main__":
    main()
