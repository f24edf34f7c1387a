"""agents.BPO: every configuration runs, learning works, and the runs are pure
functions of their key (seeds vmapped, sweeps, non-finite updates)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import GRUModel

import agents
import diffenvs
import worldmodels

# A few updates of every kind: 40 warm-up steps, then one chunk of 40 steps.
SMALL = dict(
    warmup_steps=40, eval_every=40, model_every=5, policy_every=5,
    model_batch=4, policy_batch=4,
)  # fmt: skip


def _model(name, env, key):
    if name == "simulator":
        return None
    if name == "user-gru":
        return GRUModel(env.state_dim, env.action_dim, key=key)
    return worldmodels.make(name, env, key=key)


# Every model family, the simulator and a user's model, with the stop-gradient or
# the full-gradient objective (each family's objective is checked in both forms
# against the sequential unroll in test_objective.py). awm-rnn runs below (seeds,
# sweeps), the simulator and awm-lstm with the stop-gradient in the learning tests.
CONFIGURATIONS = [
    ("simulator", True), ("awm-transformer", False), ("awm-lstm", True),
    ("hwm-transformer", True), ("hwm-lstm", False), ("markov", True),
    ("user-gru", False),
]  # fmt: skip
assert {name for name, _ in CONFIGURATIONS} | {"awm-rnn"} == {
    "simulator",
    "user-gru",
    *worldmodels.names(),
}


@pytest.mark.parametrize(
    "name, full_gradient",
    CONFIGURATIONS,
    ids=[f"{n}-{'full' if f else 'sg'}" for n, f in CONFIGURATIONS],
)
def test_every_configuration_trains_with_finite_metrics(name, full_gradient):
    env = diffenvs.make("hiv", horizon=10)
    model = _model(name, env, jr.key(0))
    bpo = agents.BPO(env, model, full_gradient=full_gradient, **SMALL)
    result = bpo.train(jr.key(1), env_steps=80)
    metrics = result.metrics

    # 40 steps of warm-up, then 40 steps with a policy update every 5.
    assert metrics["grad_norm"].shape == (8,)
    assert metrics["eval_return"].shape == (2,)
    expected = {"imagined_return", "grad_norm", "entropy", "eval_return"}
    if model is not None:
        expected |= {"model_loss", "cosine_similarity", "relative_error"}
        assert np.sum(metrics["model_updates"]) == 8
        assert result.model is not None
    for name_ in expected:
        assert np.all(np.isfinite(metrics[name_])), name_
    assert metrics["skipped_policy_updates"] == 0
    assert metrics["dropped_episodes"] == 0
    # The trained policy is deterministic and drives the real task.
    trajectory = env.rollout(result.policy, jr.key(2))
    assert np.all(np.isfinite(trajectory.states))


def test_bpo_through_simulator_learns_cancer():
    env = diffenvs.make("cancer", horizon=100)
    result = agents.BPO(env, gradient_diagnostics=False).train(jr.key(0), 4000)
    assert result.metrics["normalized_score"][-1] >= 0.9


def test_bpo_through_awm_lstm_learns_credit_assignment():
    env = diffenvs.make("credit_assignment", horizon=50)
    model = worldmodels.make("awm-lstm", env, key=jr.key(0))
    bpo = agents.BPO(env, model, gradient_diagnostics=False)
    result = bpo.train(jr.key(1), env_steps=4000)
    # The optimum is 10; a random policy scores far below it.
    assert result.metrics["eval_return"][-1] >= 9.5


def test_bpo_through_awm_finds_the_one_bounce_optimum():
    """The return has a kink at a = -0.5 and its optimum at a = 0.25 (ENVS.md); the
    first action of the deterministic policy must find the optimum."""
    env = diffenvs.make("one_bounce", horizon=20)
    model = worldmodels.make("awm-lstm", env, key=jr.key(0))
    bpo = agents.BPO(env, model, gradient_diagnostics=False)
    result = bpo.train(jr.key(1), env_steps=4000)
    s1 = env.initial_state()
    first = result.policy(diffenvs.observation(s1, 0, env.horizon))
    assert abs(float(first[0]) - 0.25) <= 0.05


def _leaves(tree):
    """The arrays of a pytree as NumPy arrays, PRNG keys as their key data."""
    arrays = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    return [
        np.asarray(
            jr.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )
        for x in arrays
    ]


def _key_free(state):
    return eqx.tree_at(lambda s: s.key, state, None)


def test_same_key_same_result_and_vmapped_seeds_equal_separate_runs():
    # awm-rnn in the contract test's setting; its metrics must be finite too.
    env = diffenvs.make("hiv", horizon=10)
    bpo = agents.BPO(env, worldmodels.make("awm-rnn", env, key=jr.key(0)), **SMALL)
    key = jr.key(3)
    together = bpo.train(key, env_steps=80, seeds=3)
    again = bpo.train(key, env_steps=80, seeds=3)
    for name, value in together.metrics.items():
        assert np.all(np.isfinite(value)), name
    for a, b in zip(_leaves(together.state), _leaves(again.state), strict=True):
        np.testing.assert_array_equal(a, b)
    for name, value in together.metrics.items():
        np.testing.assert_array_equal(value, again.metrics[name], err_msg=name)

    # Seed i of a vmapped run is the run from the i-th split key.
    for i, seed_key in enumerate(jr.split(key, 3)):
        alone = bpo.train(seed_key, env_steps=80)
        for name, value in alone.metrics.items():
            np.testing.assert_allclose(
                together.metrics[name][i], value, rtol=1e-5, atol=1e-6, err_msg=name
            )
        seed_state = jax.tree.map(
            lambda x, i=i: x[i] if eqx.is_array(x) else x, together.state
        )
        for a, b in zip(
            _leaves(_key_free(seed_state)), _leaves(_key_free(alone.state)), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _sweep(bpo, key, learning_rates):
    """A vmapped sweep over the policy's learning rate: one state per value."""
    learning_rates = jnp.asarray(learning_rates, float)

    def init(rate):
        swept = eqx.tree_at(lambda b: b.hyper.policy_learning_rate, bpo, rate)
        return swept.init(key)

    return eqx.filter_vmap(init)(learning_rates)


def test_vmapped_sweep_and_non_finite_updates_skipped_per_member():
    """A learning-rate sweep is a vmap; an infinite learning rate makes every
    policy update non-finite: those updates are skipped and counted for that member
    alone, and the other member equals its own unswept run."""
    env = diffenvs.make("hiv", horizon=10)
    bpo = agents.BPO(env, worldmodels.make("awm-rnn", env, key=jr.key(0)), **SMALL)
    key = jr.key(4)
    chunk = eqx.filter_jit(eqx.filter_vmap(bpo.chunk))
    state = initial = _sweep(bpo, key, [1e-3, jnp.inf])
    for _ in range(2):
        state, metrics = chunk(state)
    assert np.asarray(state.skipped).tolist() == [[0, 0], [0, 8]]
    assert all(np.all(np.isfinite(leaf)) for leaf in _leaves(state.policy))
    # The member that skipped every update kept its initial weights (only its
    # normaliser was fitted, at the end of warm-up).
    weights = lambda p: eqx.filter(p, worldmodels.parameters(p))  # noqa: E731
    kept, before = weights(state.policy), weights(initial.policy)
    for a, b in zip(_leaves(kept), _leaves(before), strict=True):
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.array_equal(a[0], b[0])

    plain = bpo.train(key, env_steps=80)
    np.testing.assert_allclose(
        metrics["normalized_score"][0], plain.metrics["normalized_score"][-1],
        rtol=1e-5,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="skipped 0 model and 8 policy updates"):
        diverging = jnp.asarray(jnp.inf, float)
        eqx.tree_at(lambda b: b.hyper.policy_learning_rate, bpo, diverging).train(
            key, env_steps=80
        )


@pytest.mark.parametrize(
    "option, value, match",
    [
        ("policy_every", 0, "policy_every must be a positive int"),
        ("model_batch", 2.5, "model_batch must be a positive int"),
        ("warmup_steps", -1, "warmup_steps must be a non-negative int"),
        ("warmup_actions", "random", "warmup_actions must be 'uniform' or 'policy'"),
        ("policy_learning_rate", float("nan"), "policy_learning_rate must be finite"),
        ("entropy_coefficient", -0.1, "entropy_coefficient must be non-negative"),
    ],
)
def test_bad_settings_are_named(option, value, match):
    env = diffenvs.make("cancer", horizon=10)
    with pytest.raises(ValueError, match=match):
        agents.BPO(env, **{option: value})


def test_bad_arguments_are_named():
    env = diffenvs.make("cancer", horizon=10)
    with pytest.raises(TypeError, match="env must be a diffenvs task"):
        agents.BPO("cancer")
    with pytest.raises(TypeError, match="implement predict"):
        agents.BPO(env, model=object())
    # A model built for another task fails at construction, not inside training.
    other = worldmodels.make("awm-rnn", diffenvs.make("hiv", horizon=10), key=jr.key(0))
    with pytest.raises(ValueError, match="model.predict fails on an episode of task"):
        agents.BPO(env, model=other)
    wrong = GRUModel(env.state_dim + 1, env.action_dim, key=jr.key(0))
    with pytest.raises(ValueError, match="model.predict"):
        agents.BPO(env, model=wrong)
    bpo = agents.BPO(env, **SMALL)
    with pytest.raises(ValueError, match="env_steps must be a positive int"):
        bpo.train(jr.key(0), env_steps=0)
    with pytest.raises(ValueError, match="seeds must be a positive int"):
        bpo.train(jr.key(0), env_steps=40, seeds=0)
    with pytest.raises(ValueError, match="single PRNG key"):
        bpo.train(jr.split(jr.key(0), 2), env_steps=40)
    with pytest.raises(TypeError, match=r"key must be a PRNG key such as"):
        bpo.train(0, env_steps=40)
