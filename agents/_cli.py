"""The command line: `python -m agents train ...` trains BPO on one task and writes
a run folder (settings, metrics as JSON lines and CSV, a learning curve, the
checkpoint)."""

from __future__ import annotations

import argparse
import csv
import datetime
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.random as jr
import numpy as np

import diffenvs
import worldmodels

from ._bpo import BPO, PAPER
from ._train import UPDATE_METRICS, Result

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "swish": jax.nn.swish,
    "tanh": jax.nn.tanh,
    "gelu": jax.nn.gelu,
}

# Every keyword of `BPO`, as (flag type, help). `test_cli` checks the two agree.
SETTINGS: dict[str, tuple[Any, str]] = {
    "model_every": (int, "environment steps per model update"),
    "policy_every": (int, "environment steps per policy update"),
    "model_batch": (int, "episodes per model update"),
    "policy_batch": (int, "imagined episodes per policy update"),
    "model_learning_rate": (float, "Adam learning rate of the model"),
    "policy_learning_rate": (float, "Adam learning rate of the policy"),
    "max_grad_norm": (float, "global-norm clipping of both gradients"),
    "entropy_coefficient": (float, "weight of the maximum-entropy bonus"),
    "buffer_size": (int, "environment steps the replay buffer holds"),
    "warmup_steps": (int, "environment steps collected before any update"),
    "warmup_actions": (("uniform", "policy"), "actions during warm-up"),
    "eval_every": (int, "environment steps between evaluations (one chunk)"),
    "full_gradient": (bool, "no stop-gradient on the policy input (ablation)"),
    "gradient_diagnostics": (bool, "compare each policy gradient with the simulator's"),
    "policy_width": (int, "hidden width of the policy MLP"),
    "policy_depth": (int, "hidden layers of the policy MLP"),
    "policy_activation": (tuple(ACTIVATIONS), "activation of the policy MLP"),
}
RUN_OPTIONS = ("task", "horizon", "model", "seeds", "env_steps", "seed", "preset")


def _number(kind: type, low: float, strict: bool):
    """An argparse type: a finite `kind` above `low` (or at it, unless strict)."""
    bound = f"> {low}" if strict else f">= {low}"
    name = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (
            value is None
            or not np.isfinite(value)
            or value < low
            or (strict and value == low)
        ):
            raise argparse.ArgumentTypeError(f"expected {name} {bound}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


_positive = _number(int, 0, strict=True)
_non_negative_int = _number(int, 0, strict=False)
_non_negative_float = _number(float, 0.0, strict=False)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m agents",
        description="Backpropagation-based policy optimisation (Ma et al. 2024, "
        "Algorithm 1) through the simulator or a world model learned alongside.",
    )
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train BPO on one task",
        description="Train BPO on one task and write a run folder: config.json, "
        "metrics.jsonl, evaluations.csv, updates.csv, episodes.csv, summary.json, "
        "learning_curve.png (with matplotlib) and checkpoint.eqx.",
    )
    train.set_defaults(command_parser=train)
    run = train.add_argument_group("run")
    run.add_argument(
        "--task", default="cancer", choices=diffenvs.names(), help="(cancer)"
    )
    run.add_argument("--horizon", type=_positive, default=100, help="(100)")
    run.add_argument(
        "--model",
        default="simulator",
        choices=("simulator", *worldmodels.names()),
        help="differentiate through the simulator or a world model learned "
        "alongside (simulator)",
    )
    run.add_argument("--seeds", type=_positive, default=1, help="seeds, vmapped (1)")
    run.add_argument(
        "--env-steps", type=_positive, default=10_000, help="per seed (10000)"
    )
    run.add_argument("--seed", type=_non_negative_int, default=0, help="PRNG seed (0)")
    run.add_argument(
        "--preset",
        choices=("laptop", "paper"),
        default="laptop",
        help="laptop: the BPO defaults; paper: the published settings "
        "(an accelerator setting); flags below override either (laptop)",
    )
    out = train.add_argument_group("output")
    out.add_argument(
        "--out", type=Path, default=None, help="run folder (default: runs/<name>)"
    )
    out.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue the run in DIR with its settings (no other run flag allowed)",
    )
    out.add_argument("--checkpoint-every", type=_positive, default=1, help="chunks (1)")
    out.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar with the latest evaluation (on)",
    )
    settings = train.add_argument_group(
        "BPO settings", "default: the preset's value (see help(agents.BPO))"
    )
    laptop = {
        name: p.default
        for name, p in inspect.signature(BPO.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    for name, (kind, text) in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        default = laptop[name]
        if name == "policy_activation":
            default = default.__name__
        text = f"{text} (laptop {default}, paper {PAPER.get(name, default)})"
        if kind is bool:
            settings.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif isinstance(kind, tuple):
            settings.add_argument(flag, choices=kind, default=None, help=text)
        elif kind is float:
            settings.add_argument(
                flag, type=_non_negative_float, default=None, help=text
            )
        elif name == "warmup_steps":
            settings.add_argument(flag, type=_non_negative_int, default=None, help=text)
        else:
            settings.add_argument(flag, type=_positive, default=None, help=text)
    return top


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name: getattr(args, name)
        for name in SETTINGS
        if getattr(args, name) is not None
    }


def build(config: dict[str, Any]) -> BPO:
    """The BPO agent a run's `config` describes (the same on resume)."""
    env = diffenvs.make(config["task"], horizon=config["horizon"])
    model = None
    if config["model"] != "simulator":
        model_key = jr.fold_in(jr.key(config["seed"]), 1)
        model = worldmodels.make(config["model"], env, key=model_key)
    overrides = dict(config["settings"])
    if "policy_activation" in overrides:
        overrides["policy_activation"] = ACTIVATIONS[overrides["policy_activation"]]
    if config["preset"] == "paper":
        return BPO.paper(env, model, **overrides)
    return BPO(env, model, **overrides)


def _run_name(config: dict[str, Any]) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{config['task']}-H{config['horizon']}-{config['model']}-{stamp}"


def _records(result: Result, seeds: int) -> list[dict[str, Any]]:
    """One record per seed and evaluation: the evaluation, and the means of the
    training metrics over the chunk that led to it."""
    m = result.metrics
    out = []
    for seed in range(seeds):
        previous = 0
        for i, step in enumerate(m["eval_env_steps"][seed]):
            within = lambda t: (t > previous) & (t <= step)  # noqa: B023, E731
            episodes = within(m["env_steps"][seed])
            updates = within(m["update_env_steps"][seed])
            record: dict[str, Any] = dict(
                seed=seed,
                env_steps=int(step),
                eval_return=float(m["eval_return"][seed, i]),
                normalized_score=float(m["normalized_score"][seed, i]),
                train_return=_mean(m["train_return"][seed][episodes]),
                policy_updates=int(np.sum(updates)),
            )
            for name in UPDATE_METRICS[:-2]:
                if name in m:
                    record[name] = _mean(m[name][seed][updates])
            if result.model is not None:
                trained = episodes & (m["model_updates"][seed] > 0)
                record["model_loss"] = _mean(m["model_loss"][seed][trained])
            out.append(record)
            previous = step
    return out


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _rows(m: dict[str, np.ndarray], names: list[str], seeds: int) -> list[list]:
    """One row per seed and entry of the metrics `names` (arrays of one length)."""
    return [
        [seed, *(m[name][seed, i].item() for name in names)]
        for seed in range(seeds)
        for i in range(m[names[0]].shape[1])
    ]


def write_metrics(folder: Path, result: Result, seeds: int) -> list[dict[str, Any]]:
    """metrics.jsonl and evaluations.csv (per evaluation), updates.csv (per policy
    update) and episodes.csv (per collected episode), every seed in one file."""
    m = result.metrics
    records = _records(result, seeds)
    with (folder / "metrics.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    _write_csv(
        folder / "evaluations.csv",
        list(records[0]),
        [list(r.values()) for r in records],
    )
    names = ["update_env_steps", *(n for n in UPDATE_METRICS[:-1] if n in m)]
    _write_csv(folder / "updates.csv", ["seed", *names], _rows(m, names, seeds))
    episode = ["env_steps", "train_return"]
    if result.model is not None:
        episode += ["model_loss", "model_updates"]
    _write_csv(folder / "episodes.csv", ["seed", *episode], _rows(m, episode, seeds))
    return records


def plot(folder: Path, result: Result, title: str) -> Path | None:
    """learning_curve.png: normalised score against environment steps, one line per
    seed and their mean; `None` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    m = result.metrics
    steps = m["eval_env_steps"][0]
    scores = m["normalized_score"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for seed, row in enumerate(scores):
        ax.plot(steps, row, color="tab:blue", alpha=0.3, lw=1,
                label="seeds" if seed == 0 else None)  # fmt: skip
    ax.plot(steps, scores.mean(axis=0), color="tab:blue", lw=2, label="mean")
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("normalised score")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = folder / "learning_curve.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def summary(result: Result, seeds: int, env_steps: int) -> dict[str, Any]:
    """The final normalised score per seed and aggregated, with the throughput.
    Vmapped seeds share one wall time."""
    m = result.metrics
    final = m["normalized_score"][:, -1]
    wall = float(result.wall_time)
    per_seed = [
        dict(
            seed=seed,
            final_return=float(m["eval_return"][seed, -1]),
            final_score=float(final[seed]),
            best_score=float(np.max(m["normalized_score"][seed])),
            skipped_updates=int(
                m["skipped_model_updates"][seed] + m["skipped_policy_updates"][seed]
            ),
        )
        for seed in range(seeds)
    ]
    return dict(
        seeds=per_seed,
        final_score_mean=float(np.mean(final)),
        final_score_std=float(np.std(final)),
        final_score_min=float(np.min(final)),
        final_score_max=float(np.max(final)),
        env_steps=env_steps,
        wall_time=wall,
        env_steps_per_second=seeds * env_steps / wall if wall > 0 else None,
    )


def table(summary_: dict[str, Any]) -> str:
    rows = [("seed", "final return", "final score", "best score", "skipped")]
    for s in summary_["seeds"]:
        rows.append((
            str(s["seed"]), f"{s['final_return']:.6g}", f"{s['final_score']:.3f}",
            f"{s['best_score']:.3f}", str(s["skipped_updates"]),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(map(str.rjust, r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    rate = summary_["env_steps_per_second"]
    lines += [
        "",
        f"normalised score over {len(summary_['seeds'])} seed(s): mean "
        f"{summary_['final_score_mean']:.3f} ± {summary_['final_score_std']:.3f} "
        f"(min {summary_['final_score_min']:.3f}, max "
        f"{summary_['final_score_max']:.3f})",
        f"{summary_['env_steps']} environment steps per seed in "
        f"{summary_['wall_time']:.1f} s (compilation included): "
        + (f"{rate:.0f} environment steps/s over all seeds" if rate else "n/a"),
    ]
    return "\n".join(lines)


def _config(
    args: argparse.Namespace, train: argparse.ArgumentParser
) -> tuple[dict[str, Any], Path]:
    if args.resume is None:
        config = {name: getattr(args, name) for name in RUN_OPTIONS}
        config["settings"] = _overrides(args)
        folder = args.out if args.out is not None else Path("runs") / _run_name(config)
        if (folder / "config.json").exists():
            train.error(
                f"--out {folder} already holds a run; continue it with --resume "
                f"{folder} or choose another folder"
            )
        return config, folder
    folder = args.resume
    given = [
        name for name in (*RUN_OPTIONS, *SETTINGS, "out")
        if getattr(args, name) != train.get_default(name)
    ]  # fmt: skip
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        train.error(
            f"--resume {folder} continues a run with its own settings; {flags} "
            f"cannot be given with it"
        )
    path = folder / "config.json"
    if not path.exists():
        train.error(f"--resume {folder}: no run there (expected {path})")
    try:
        config = json.loads(path.read_text())
        missing = [n for n in (*RUN_OPTIONS, "settings") if n not in config]
    except (OSError, json.JSONDecodeError) as error:
        train.error(f"--resume {folder}: cannot read {path}: {error}")
    if missing:
        train.error(f"--resume {folder}: {path} lacks {', '.join(missing)}")
    return config, folder


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    train_parser = args.command_parser
    config, folder = _config(args, train_parser)
    try:
        bpo = build(config)
    except (TypeError, ValueError) as error:
        train_parser.error(str(error))

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"run folder {folder}")
    per_chunk = bpo.episodes_per_chunk * bpo.horizon
    steps = -(-config["env_steps"] // per_chunk) * per_chunk
    rounded = "" if steps == config["env_steps"] else (
        f" (asked {config['env_steps']}, rounded up to whole chunks of {per_chunk})"
    )  # fmt: skip
    print(
        f"BPO on {config['task']} (H = {config['horizon']}) through "
        f"{config['model']}, {config['seeds']} seed(s), {steps} "
        f"environment steps{rounded}, preset {config['preset']}"
    )
    seeds = config["seeds"]
    result = bpo.train(
        jr.key(config["seed"]),
        config["env_steps"],
        seeds=seeds,
        progress=args.progress,
        checkpoint=folder,
        checkpoint_every=args.checkpoint_every,
        resume=True,
    )
    write_metrics(folder, result, seeds)
    done_steps = int(result.metrics["eval_env_steps"][0, -1])
    info = summary(result, seeds, done_steps)
    (folder / "summary.json").write_text(json.dumps(info, indent=2) + "\n")
    plot(folder, result, f"BPO, {config['task']} H={config['horizon']}, "
         f"{config['model']}")  # fmt: skip
    print(table(info))
    print(f"normalised score {info['final_score_mean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
