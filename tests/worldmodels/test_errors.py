"""Bad input to `worldmodels`: each mistake raises where it is made and names the
argument and what was expected; bad data never trains or predicts silently."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import EquinoxRuntimeError

import diffenvs
import worldmodels
from worldmodels import Episodes

HORIZON = 5


@pytest.fixture(scope="module")
def env():
    return diffenvs.make("hiv", horizon=HORIZON)


@pytest.fixture(scope="module")
def episodes(env):
    return Episodes.from_env(env, jr.uniform(jr.key(0), (4, HORIZON, 1)))


# ---- Episodes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, index, value",
    [
        ("states", (2, 3, 0), jnp.nan), ("states", (0, 0, 2), jnp.inf),
        ("s1", (1, 0), jnp.nan), ("actions", (3, 4, 0), -jnp.inf),
    ],
)  # fmt: skip
def test_non_finite_data_is_refused(episodes, field, index, value):
    arrays = {name: getattr(episodes, name) for name in ("s1", "actions", "states")}
    arrays[field] = arrays[field].at[index].set(value)
    with pytest.raises(
        ValueError, match=rf"Episodes.{field} holds 1 non-finite value\(s\), the first "
        rf"at index \({', '.join(map(str, index))},?\) \(episode {index[0]}\)"
    ):  # fmt: skip
        Episodes(**arrays)


def test_lists_and_numpy_arrays_are_converted(episodes):
    from_lists = Episodes(
        episodes.s1.tolist(), np.asarray(episodes.actions), episodes.states.tolist()
    )
    for name in ("s1", "actions", "states"):
        np.testing.assert_array_equal(
            getattr(from_lists, name), getattr(episodes, name)
        )


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(actions=lambda e: e.actions[..., 0]), ValueError,
         r"Episodes.actions must have shape \(episodes, horizon, action_dim\), got "
         r"shape \(4, 5\); for a single episode"),
        (dict(s1=lambda e: e.s1[0]), ValueError,
         r"Episodes.s1 must have shape \(episodes, state_dim\)"),
        (dict(states=lambda e: e.states[0]), ValueError,
         r"Episodes.states must have shape \(episodes, horizon, state_dim\)"),
        (dict(s1=lambda e: "start"), TypeError,
         "Episodes.s1 must be a floating-point array, got str 'start'"),
        (dict(actions=lambda e: e.actions.astype(jnp.int32)), TypeError,
         "Episodes.actions must be a floating-point array, got an array of dtype "
         "int32"),
        (dict(states=lambda e: e.states[:3]), ValueError, "that agree, got shapes"),
        (dict(states=lambda e: e.states[..., :2]), ValueError,
         "s1 and states must have the same state_dim"),
    ],
    ids=["2d-actions", "1d-s1", "2d-states", "string", "integer", "count",
         "state-dim"],
)  # fmt: skip
def test_malformed_episodes_are_named(episodes, change, error, message):
    arrays = {name: getattr(episodes, name) for name in ("s1", "actions", "states")}
    for name, edit in change.items():
        arrays[name] = edit(episodes)
    with pytest.raises(error, match=message):
        Episodes(**arrays)


def test_from_env_with_one_episode_asks_for_a_leading_axis(env):
    with pytest.raises(ValueError, match=r"got shape \(5, 1\); for a single episode"):
        Episodes.from_env(env, jnp.zeros((HORIZON, 1)))
    with pytest.raises(ValueError, match=r"\(episodes, 5, 1\) for task 'hiv'"):
        Episodes.from_env(env, jnp.zeros((2, HORIZON + 1, 1)))


# ---- fit and update ----------------------------------------------------------------


def test_fit_refuses_what_it_cannot_train_on(env, episodes):
    model = worldmodels.make("markov", env, key=jr.key(0))
    empty = Episodes(episodes.s1[:0], episodes.actions[:0], episodes.states[:0])
    with pytest.raises(ValueError, match="episodes is empty"):
        worldmodels.fit(model, empty, key=jr.key(0), steps=2)
    with pytest.raises(TypeError, match="episodes must be worldmodels.Episodes"):
        worldmodels.fit(model, (episodes.s1, episodes.actions), key=jr.key(0))
    with pytest.raises(TypeError, match=r"call it first, e.g. optax.adam\(1e-3\)"):
        worldmodels.fit(model, episodes, key=jr.key(0), optimiser=optax.adam)
    with pytest.raises(TypeError, match="optimiser must be an optax"):
        worldmodels.update(model, None, episodes, optimiser="adam")


# ---- predict and the step-by-step interface ----------------------------------------


@pytest.mark.parametrize("name", worldmodels.names())
def test_sequence_lengths_are_checked(env, name):
    model = worldmodels.make(name, env, key=jr.key(0))
    s1 = env.initial_state()
    with pytest.raises(ValueError, match="actions must hold at least one step"):
        model.predict(s1, jnp.zeros((0, 1)))
    stepper = worldmodels.incremental(model)
    with pytest.raises(ValueError, match="horizon must be at least 1"):
        stepper.init(s1, 0)
    with pytest.raises(TypeError, match="horizon must be an int"):
        stepper.init(s1, 2.5)
    # The horizon may be a NumPy integer.
    stepper.init(s1, np.int64(HORIZON))

    @eqx.filter_jit
    def steps(s1, actions):
        carry = stepper.init(s1, HORIZON)
        return jax.lax.scan(stepper.step, carry, actions)[1]

    assert steps(s1, jnp.zeros((HORIZON, 1))).shape == (HORIZON, env.state_dim)
    with pytest.raises(EquinoxRuntimeError, match="step called past the horizon=5"):
        jax.block_until_ready(steps(s1, jnp.zeros((HORIZON + 1, 1))))
    with pytest.raises(EquinoxRuntimeError, match="action contains NaN"):
        jax.block_until_ready(steps(s1, jnp.full((HORIZON, 1), jnp.nan)))


def test_a_factory_that_returns_no_model_is_named(env, monkeypatch):
    # Registered into a copy of the registry, so no other test sees it.
    registry = worldmodels._registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    worldmodels.register(
        "test_not_a_model", lambda state_dim, action_dim, horizon, *, key: "model"
    )
    with pytest.raises(TypeError, match="returned str, expected a world model"):
        worldmodels.make("test_not_a_model", env, key=jr.key(0))


def test_loss_checks_that_the_episode_agrees(env, episodes):
    model = worldmodels.make("awm-lstm", env, key=jr.key(0))
    s1, actions, states = episodes.s1[0], episodes.actions[0], episodes.states[0]
    # A states array of one column would broadcast against the prediction.
    with pytest.raises(
        ValueError, match=r"states must have shape \(horizon, state_dim\) = \(5, 3\)"
    ):
        worldmodels.loss(model, s1, actions, states[:, :1])
    with pytest.raises(ValueError, match="loss takes one episode"):
        worldmodels.loss(model, episodes.s1, episodes.actions, episodes.states)


def test_rewards_from_states_checks_the_states(env):
    s1, actions = env.initial_state(), jnp.zeros((HORIZON, 1))
    with pytest.raises(
        ValueError, match=r"states must have shape \(horizon, state_dim\) = \(5, 3\)"
    ):
        env.rewards_from_states(s1, actions, jnp.zeros((HORIZON, 1)))
    with pytest.raises(ValueError, match="actions must have shape"):
        env.rewards_from_states(s1, actions[:-1], jnp.zeros((HORIZON, 3)))


@pytest.mark.parametrize("key", [0, None, np.zeros(3, np.uint32)], ids=str)
def test_a_key_that_is_not_a_prng_key_is_named(env, episodes, key):
    with pytest.raises(TypeError, match="key must be a PRNG key such as"):
        worldmodels.make("markov", env, key=key)
    model = worldmodels.make("markov", env, key=jr.key(0))
    with pytest.raises(TypeError, match="key must be a PRNG key such as"):
        worldmodels.fit(model, episodes, key=key, steps=1)
    with pytest.raises(TypeError, match="key must be a PRNG key such as"):
        env.rollout(lambda obs, k: jnp.zeros(1), key)
    # A legacy uint32 key is still a key.
    worldmodels.make("markov", env, key=jax.random.PRNGKey(0))
