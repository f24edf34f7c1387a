"""Reference returns: the optimiser against closed forms, the random baseline against
its expectation, and the shipped table against the tasks as they are now."""

import json

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffenvs
from diffenvs import __main__ as cli, _references
from diffenvs._references import TABLE_HORIZONS, fingerprint, load_table


def timber_euler_optimum(horizon: int, x0=100.0, k=1.0, duration=5.0) -> float:
    # Reinvest fully for n steps, then harvest: (H - n) dt x0 (1 + k dt)^n.
    dt = duration / horizon
    return max((horizon - n) * dt * x0 * (1 + k * dt) ** n for n in range(horizon + 1))


class _NoHint(diffenvs.OneBounce):
    # The same task without the known optimum among the optimiser's starts, so that
    # the optimiser has to find it by itself.
    def reference_actions(self):
        return None


class _CopyNoHint(diffenvs.CreditAssignment):
    def reference_actions(self):
        return None


@pytest.mark.parametrize("horizon", [20, 50])
def test_optimiser_finds_timber_bang_bang_optimum(horizon):
    with jax.enable_x64(True):
        env = diffenvs.make("timber", horizon=horizon)
        best, actions = diffenvs.optimal_return(env, num_steps=1000)
        # The optimum is bang-bang, a corner of the box that projection reaches
        # exactly, so only float64 round-off separates the two. (At H = 50 two
        # switching times tie, and the action at the switch is free.)
        np.testing.assert_allclose(best, timber_euler_optimum(horizon), rtol=1e-10)
        np.testing.assert_allclose(float(env.episode_return(actions)), best, rtol=1e-12)


def test_optimiser_on_bioreactor_matches_or_beats_u_zero():
    with jax.enable_x64(True):
        env = diffenvs.make("bioreactor", horizon=50)
        best, actions = diffenvs.optimal_return(env, num_steps=1000)
        u_zero = float(env.episode_return(-jnp.ones((50, 1))))
    # u = 0 is the continuous-time optimum, where the switching function touches
    # its threshold exactly at t = 0 (docs/envs.md). Under Euler a little control
    # at step 0 gains about 4e-6: the optimiser must find at least u = 0's return,
    # and everything after step 0 must be u = 0.
    assert best >= u_zero - 1e-12
    assert best - u_zero < 1e-5 * abs(u_zero)
    np.testing.assert_array_equal(np.asarray(actions[1:]), -1.0)


def test_optimiser_finds_the_copy_task_optimum_unaided():
    with jax.enable_x64(True):
        env = _CopyNoHint(horizon=30)
        best, actions = diffenvs.optimal_return(env, num_steps=1000)
    # The return is a concave quadratic in the actions with maximum exactly 10.
    np.testing.assert_allclose(best, 10.0, rtol=0, atol=1e-9)
    np.testing.assert_allclose(float(actions[0, 0]), 0.5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(actions[1:-1]), 0.0, atol=1e-4)


def test_optimiser_finds_the_bounce_optimum_unaided():
    with jax.enable_x64(True):
        env = _NoHint(horizon=40)
        best, actions = diffenvs.optimal_return(env, num_steps=1000)
    # Final position 2 - (1.5 + a_0) past the wall: the goal 0.25 needs a_0 = 0.25.
    np.testing.assert_allclose(float(actions[0, 0]), 0.25, atol=1e-5)
    np.testing.assert_allclose(best, 0.0, atol=1e-9)


def test_random_baseline_matches_its_expectation_on_the_copy_task():
    horizon = 20
    env = diffenvs.make("credit_assignment", horizon=horizon)
    estimate = diffenvs.random_return(env)
    # With a ~ U[-1, 1]: E[(a - 0.5)^2] = 1/3 + 1/4 and E[a^2] = 1/3, so the expected
    # return is 10 - 20 * 7/12 - (H - 2) / (3 H).
    expected = 10.0 - 20.0 * 7.0 / 12.0 - (horizon - 2) / (3.0 * horizon)
    # Standard error of the Monte-Carlo mean, from a fresh sample of the same size.
    sample = jr.uniform(jr.key(1), (_references.RANDOM_EPISODES, horizon, 1), minval=-1)
    returns = jax.vmap(env.episode_return)(sample)
    stderr = float(jnp.std(returns)) / np.sqrt(_references.RANDOM_EPISODES)
    assert abs(estimate - expected) < 4 * stderr


def test_random_baseline_is_reproducible_and_rejects_few_episodes():
    env = diffenvs.make("cancer", horizon=10)
    assert diffenvs.random_return(env) == diffenvs.random_return(env)
    with pytest.raises(ValueError, match="num_episodes"):
        diffenvs.random_return(env, num_episodes=10)


def test_the_table_covers_every_control_task_and_horizon():
    table = load_table()
    for name in diffenvs.CONTROL_TASKS:
        for horizon in TABLE_HORIZONS:
            entry = table[name][str(horizon)]
            assert entry["optimal"] > entry["random"], (name, horizon)


@pytest.mark.parametrize("name", diffenvs.CONTROL_TASKS)
def test_the_table_belongs_to_the_tasks_as_they_are(name):
    # A change to a task's equations, constants or defaults changes its
    # fingerprint; the table must then be recomputed with the script.
    table = load_table()
    for horizon in TABLE_HORIZONS:
        env = diffenvs.make(name, horizon=horizon)
        assert table[name][str(horizon)]["fingerprint"] == fingerprint(env), (
            f"{name} at H={horizon} changed since `python -m diffenvs references` ran"
        )


def test_the_table_reproduces_timber_closed_form_and_random_baseline():
    table = load_table()
    for horizon in TABLE_HORIZONS:
        np.testing.assert_allclose(
            table["timber"][str(horizon)]["optimal"],
            timber_euler_optimum(horizon),
            rtol=1e-9,  # float64 round-off only
        )
    # The random baseline is seeded: recomputing one entry gives it back exactly
    # (up to float64 reduction order).
    with jax.enable_x64(True):
        env = diffenvs.make("mould", horizon=20)
    np.testing.assert_allclose(
        diffenvs.random_return(env), table["mould"]["20"]["random"], rtol=1e-12
    )


def test_the_command_line_rewrites_the_entries_asked_for(monkeypatch, tmp_path):
    """`python -m diffenvs references --tasks ... --horizons ...` computes each entry
    for the default task built in float64 (the computation itself in the default
    precision, as in any other process) and keeps the other entries."""
    shipped = load_table()
    path = tmp_path / "references.json"
    path.write_text(_references.TABLE_PATH.read_text())
    monkeypatch.setattr(_references, "TABLE_PATH", path)
    computed = []

    def fake(env, **kwargs):
        computed.append((env.name, env.horizon, env.k.dtype, jnp.zeros(()).dtype))
        return {"random": 1.0, "optimal": 2.0, "fingerprint": fingerprint(env)}

    monkeypatch.setattr(_references, "compute_references", fake)
    cli.main(["references", "--tasks", "hiv", "--horizons", "10", "50"])
    assert computed == [
        ("hiv", 10, jnp.float64, jnp.float32),
        ("hiv", 50, jnp.float64, jnp.float32),
    ]
    entries = json.loads(path.read_text())["entries"]
    for horizon in ("10", "50"):
        assert entries["hiv"][horizon]["optimal"] == 2.0
    assert entries["hiv"]["20"] == shipped["hiv"]["20"]
    assert {name: rows for name, rows in entries.items() if name != "hiv"} == {
        name: rows for name, rows in shipped.items() if name != "hiv"
    }


def test_references_come_from_the_table_without_computing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("computed a reference that the table holds")

    monkeypatch.setattr(_references, "compute_references", fail)
    monkeypatch.setattr(_references, "_memory", {})
    env = diffenvs.make("hiv", horizon=500)
    refs = env.references()
    entry = load_table()["hiv"]["500"]
    assert (refs.random, refs.optimal) == (entry["random"], entry["optimal"])
    with jax.enable_x64(True):
        np.testing.assert_allclose(float(env.normalized_score(refs.random)), 0.0)
        np.testing.assert_allclose(float(env.normalized_score(refs.optimal)), 1.0)
    # In float32 a return near 823 is only resolved to 823 * 2^-24, which the narrow
    # controllable range (about 15) magnifies into the score.
    resolution = 2.0**-24 * abs(refs.optimal) / (refs.optimal - refs.random)
    score = float(env.normalized_score(jnp.float32(refs.optimal)))
    np.testing.assert_allclose(score, 1.0, atol=4 * resolution)


def test_other_configurations_are_computed_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFENVS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_references, "_memory", {})
    calls = []
    compute = _references.compute_references

    def counting(env, **kwargs):
        calls.append(env.horizon)
        return compute(env, **kwargs)

    monkeypatch.setattr(_references, "compute_references", counting)
    # A constant other than the default makes the shipped table inapplicable.
    env = diffenvs.make("timber", horizon=12, k=1.2)
    first = env.references()
    np.testing.assert_allclose(
        first.optimal, timber_euler_optimum(12, k=1.2), rtol=1e-9
    )
    (cached,) = tmp_path.iterdir()
    assert json.loads(cached.read_text())["fingerprint"] == fingerprint(env)
    monkeypatch.setattr(_references, "_memory", {})
    assert env.references() == first
    assert calls == [12]


def test_an_unusable_cache_costs_a_warning_not_the_result(monkeypatch, tmp_path):
    """A cache folder that cannot be created keeps the computed result (with a
    warning); a corrupt cache file is recomputed and replaced, atomically."""
    monkeypatch.setattr(_references, "_memory", {})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DIFFENVS_CACHE_DIR", str(blocker / "cache"))
    env = diffenvs.make("timber", horizon=12, k=1.2)
    with pytest.warns(UserWarning, match="could not write the reference cache"):
        refs = env.references()
    np.testing.assert_allclose(refs.optimal, timber_euler_optimum(12, k=1.2), rtol=1e-9)

    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFENVS_CACHE_DIR", str(folder))
    monkeypatch.setattr(_references, "_memory", {})
    env.references()
    (cached,) = folder.iterdir()
    cached.write_text('{"random": 1.0, "optim')  # a half-written file
    monkeypatch.setattr(_references, "_memory", {})
    with pytest.warns(UserWarning, match="unreadable reference cache"):
        assert env.references() == refs
    assert json.loads(cached.read_text())["optimal"] == refs.optimal
    assert [p.name for p in folder.iterdir()] == [cached.name]  # no temporary left


def test_fingerprint_separates_configurations_and_ignores_precision():
    base = fingerprint(diffenvs.make("hiv", horizon=50))
    with jax.enable_x64(True):
        assert fingerprint(diffenvs.make("hiv", horizon=50)) == base
    assert fingerprint(diffenvs.make("hiv", horizon=51)) != base
    assert fingerprint(diffenvs.make("hiv", horizon=50, k=3e-5)) != base
    import diffrax

    assert fingerprint(diffenvs.make("hiv", horizon=50, solver=diffrax.Heun())) != base


def test_references_need_a_concrete_task():
    env = diffenvs.make("hiv", horizon=10)

    @jax.jit
    def inside(k):
        return diffenvs.make("hiv", horizon=10, k=k).references().optimal

    with pytest.raises(ValueError, match="outside jit"):
        inside(env.k)
