"""Runs of agents.BPO: checkpoints and resume, sharding over devices, the command
line."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import jax.random as jr
import numpy as np
import pytest

import agents
import diffenvs
import worldmodels
from agents import _cli

# The command line's flags for these settings build the same agent, so one
# compiled chunk serves the checkpoint tests and the command-line tests.
SETTINGS = dict(warmup_steps=40, eval_every=40, policy_every=5, policy_batch=4)
FLAGS = [
    "--task", "cancer", "--horizon", "10", "--env-steps", "80", "--warmup-steps",
    "40", "--eval-every", "40", "--policy-every", "5", "--policy-batch", "4",
    "--no-progress",
]  # fmt: skip


def _run_script(tmp_path, source, *args, env=None):
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(source))
    return subprocess.Popen(
        [sys.executable, str(path), *map(str, args)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# Trains awm-rnn BPO on hiv for 5 chunks, checkpointing after each; with a kill
# point, the process kills itself (SIGKILL) as chunk `kill` ends, before that
# chunk's checkpoint is written. The final state is saved for comparison.
RESUMABLE = """
    import os, signal, sys
    import equinox as eqx, jax.random as jr, numpy as np
    import agents, diffenvs, worldmodels

    folder, kill = sys.argv[1], int(sys.argv[2])
    env = diffenvs.make("hiv", horizon=10)
    model = worldmodels.make("awm-rnn", env, key=jr.key(0))
    bpo = agents.BPO(env, model, warmup_steps=40, eval_every=20, model_every=5,
                     policy_every=5, model_batch=4, policy_batch=4)

    def callback(done, metrics):
        if done == kill:
            os.kill(os.getpid(), signal.SIGKILL)

    result = bpo.train(jr.key(5), env_steps=100, checkpoint=folder, resume=True,
                       callback=callback)
    state = eqx.tree_at(lambda s: s.key, result.state, jr.key_data(result.state.key))
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(
        eqx.filter(state, eqx.is_array))]
    np.savez(os.path.join(folder, "final.npz"), *leaves,
             **{"metric_" + k: v for k, v in result.metrics.items()})
"""


def _final(folder):
    with np.load(folder / "final.npz") as data:
        return {name: data[name] for name in data.files}


def test_killed_and_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killed.mkdir()
    whole.mkdir()
    first = _run_script(killed, RESUMABLE, killed, 3)
    reference = _run_script(whole, RESUMABLE, whole, 0)
    assert first.wait(timeout=600) == -9, first.communicate()[1]
    # Killed as chunk 3 ended: the checkpoint holds two chunks.
    header = json.loads((killed / "checkpoint.eqx").read_bytes().partition(b"\n")[0])
    assert header["done"] == 2
    resumed = _run_script(killed, RESUMABLE, killed, 0)
    assert resumed.wait(timeout=600) == 0, resumed.communicate()[1]
    assert reference.wait(timeout=600) == 0, reference.communicate()[1]
    ours, expected = _final(killed), _final(whole)
    assert ours.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished run's folder, with its agent."""
    folder = tmp_path_factory.mktemp("run")
    bpo = agents.BPO(diffenvs.make("cancer", horizon=10), **SETTINGS)
    bpo.train(jr.key(0), env_steps=80, checkpoint=folder)
    return folder, bpo


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    (target / "checkpoint.eqx").write_bytes((folder / "checkpoint.eqx").read_bytes())
    return target


def test_finished_checkpoint_resumes_to_the_same_result(checkpointed, tmp_path):
    folder, bpo = checkpointed
    folder = _copy(folder, tmp_path)
    before = (folder / "checkpoint.eqx").read_bytes()
    resumed = bpo.train(jr.key(0), env_steps=80, checkpoint=folder, resume=True)
    fresh = bpo.train(jr.key(0), env_steps=80)
    for name, value in fresh.metrics.items():
        np.testing.assert_array_equal(resumed.metrics[name], value, err_msg=name)
    assert (folder / "checkpoint.eqx").read_bytes() == before


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda raw: raw[:-100], "is truncated"),
        (lambda raw: raw[:-50] + bytes([raw[-50] ^ 1]) + raw[-49:], "is corrupted"),
        (lambda raw: b"not a checkpoint\n" + raw, "is not a BPO checkpoint"),
        (lambda raw: b"", "is not a BPO checkpoint"),
    ],
    ids=["truncated", "flipped-bit", "header", "empty"],
)
def test_damaged_checkpoint_is_refused(checkpointed, tmp_path, damage, match):
    folder, bpo = checkpointed
    folder = _copy(folder, tmp_path)
    path = folder / "checkpoint.eqx"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(agents.CheckpointError, match=match):
        bpo.train(jr.key(0), env_steps=80, checkpoint=folder, resume=True)


def _other_task(bpo):
    return agents.BPO(diffenvs.make("bioreactor", horizon=10), **SETTINGS)


def _other_constants(bpo):
    return agents.BPO(diffenvs.make("cancer", horizon=10, r=0.4), **SETTINGS)


def _other_model(bpo):
    env = bpo.env
    return agents.BPO(env, worldmodels.make("markov", env, key=jr.key(0)), **SETTINGS)


def _other_settings(bpo):
    return agents.BPO(bpo.env, **{**SETTINGS, "policy_learning_rate": 3e-4})


@pytest.mark.parametrize(
    "change, options, field",
    [
        (_other_task, {}, "task"),
        (_other_constants, {}, "task"),
        (_other_model, {}, "model"),
        (_other_settings, {}, "settings"),
        (lambda bpo: bpo, {"seeds": 2}, "run"),
        (lambda bpo: bpo, {"key": jr.key(1)}, "run"),
    ],
    ids=["task", "constants", "model", "settings", "seeds", "key"],
)
def test_mismatched_checkpoint_is_refused(checkpointed, change, options, field):
    folder, bpo = checkpointed
    options = {"key": jr.key(0), **options}
    with pytest.raises(agents.CheckpointError, match=f"another {field}"):
        change(bpo).train(
            options.pop("key"), env_steps=80, checkpoint=folder, resume=True, **options
        )


SHARDED = """
    import jax, jax.random as jr, numpy as np
    import agents, diffenvs

    assert len(jax.devices()) == 4, jax.devices()
    bpo = agents.BPO(diffenvs.make("cancer", horizon=10), warmup_steps=40,
                     eval_every=40, policy_every=5, policy_batch=4)
    sharded = bpo.train(jr.key(0), env_steps=80, seeds=4, devices=jax.devices())
    plain = bpo.train(jr.key(0), env_steps=80, seeds=4)
    leaf = jax.tree.leaves(sharded.state.policy)[0]
    assert len(leaf.sharding.device_set) == 4, leaf.sharding
    # One seed per device against four vmapped on one: float32 reductions over
    # other batch shapes, a few ulps per update, compounded over eight updates.
    for name, value in plain.metrics.items():
        np.testing.assert_allclose(sharded.metrics[name], value, rtol=1e-5,
                                   err_msg=name)
    print("ok")
"""


def test_seeds_sharded_over_devices_equal_one_device(tmp_path):
    flags = "--xla_force_host_platform_device_count=4"
    process = _run_script(tmp_path, SHARDED, env={"XLA_FLAGS": flags})
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert out.strip().endswith("ok")


def test_every_bpo_setting_is_a_flag():
    keywords = {
        name
        for name, p in inspect.signature(agents.BPO.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert set(_cli.SETTINGS) == keywords
    help_text = _cli.parser().format_help()
    assert "train" in help_text


def test_command_line_trains_writes_a_run_folder_and_resumes(tmp_path, capsys):
    folder = tmp_path / "run"
    assert _cli.main(["train", *FLAGS, "--out", str(folder)]) == 0
    printed = capsys.readouterr().out
    files = {p.name for p in folder.iterdir()}
    assert {
        "config.json", "metrics.jsonl", "evaluations.csv", "updates.csv",
        "episodes.csv", "summary.json", "checkpoint.eqx",
    } <= files  # fmt: skip
    summary = json.loads((folder / "summary.json").read_text())
    score = summary["final_score_mean"]
    assert np.isfinite(score)
    assert printed.strip().endswith(f"normalised score {score:.3f}")
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["env_steps"] == 80
    header = (folder / "updates.csv").read_text().splitlines()
    assert len(header) == 1 + 8  # eight policy updates after the warm-up

    # Resuming a finished run changes nothing and prints the same score; its wall
    # time is that of the first session (when the checkpoint was written) onward.
    checkpoint = (folder / "checkpoint.eqx").read_bytes().partition(b"\n")[0]
    recorded = json.loads(checkpoint)["wall_time"]
    assert 0 < recorded <= summary["wall_time"]
    assert _cli.main(["train", "--resume", str(folder), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"normalised score {score:.3f}")
    again = json.loads((folder / "summary.json").read_text())
    assert again["wall_time"] >= recorded
    timing = ("wall_time", "env_steps_per_second")
    assert {k: v for k, v in again.items() if k not in timing} == {
        k: v for k, v in summary.items() if k not in timing
    }


def test_command_line_matches_the_python_api(tmp_path, capsys):
    folder = tmp_path / "run"
    _cli.main(["train", *FLAGS, "--seed", "7", "--out", str(folder)])
    capsys.readouterr()
    bpo = agents.BPO(diffenvs.make("cancer", horizon=10), **SETTINGS)
    result = bpo.train(jr.key(7), env_steps=80, seeds=1)
    summary = json.loads((folder / "summary.json").read_text())
    np.testing.assert_allclose(
        summary["final_score_mean"], result.metrics["normalized_score"][0, -1]
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--horizon", "0"], "--horizon: expected an integer > 0"),
        (["train", "--task", "pong"], "--task: invalid choice: 'pong'"),
        (["train", "--model", "gpt"], "--model: invalid choice: 'gpt'"),
        (["train", "--policy-learning-rate", "nan"], "expected a number >= 0.0"),
        (["train", "--env-steps", "1e3"], "--env-steps: expected an integer > 0"),
        (["train", "--resume", "runs/x", "--task", "hiv"], "--task cannot be given"),
        (["train", "--resume", "/nonexistent"], "no run there"),
        (["train", "--policy-every", "5", "--warmup-actions", "x"], "invalid choice"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_run_folder_is_not_overwritten(capsys, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        _cli.main(["train", *FLAGS, "--out", str(folder)])
    assert "already holds a run" in capsys.readouterr().err
    # A corrupt config is an error about the folder, not a traceback.
    with pytest.raises(SystemExit):
        _cli.main(["train", "--resume", str(folder)])
    assert "lacks" in capsys.readouterr().err
