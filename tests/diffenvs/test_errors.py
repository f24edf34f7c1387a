"""Bad input: each mistake is reported where it is made, naming the argument, the
value and what was expected; bad data is caught under `jit` and `vmap` too."""

import dataclasses
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import EquinoxRuntimeError, Replay, jit_evaluate, uniform_actions
from hypothesis import given, strategies as st

import diffenvs

# The tasks that ship with the package, read at collection. Tests that build every
# task loop over these rather than over `names()` at run time, which also holds
# whatever other test modules registered.
BUILTIN = diffenvs.names()
HORIZON = 10


# ---- the registry ----------------------------------------------------------------


def test_unknown_task_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown task name='pendulum'") as info:
        diffenvs.make("pendulum", horizon=HORIZON)
    for name in BUILTIN:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="valid names are"):
        diffenvs.make(3, horizon=HORIZON)


@pytest.mark.parametrize("horizon", [0, -1])
def test_non_positive_horizon(horizon):
    for name in BUILTIN:
        with pytest.raises(ValueError, match=f"horizon={horizon}"):
            diffenvs.make(name, horizon=horizon)


# Equinox warns before the check runs that a NumPy scalar is being made static.
@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
@pytest.mark.parametrize("horizon", [2.5, True, "10", None, np.float64(10)])
def test_horizon_that_is_not_an_int(horizon):
    for name in BUILTIN:
        with pytest.raises(TypeError, match="horizon must be a positive int"):
            diffenvs.make(name, horizon=horizon)


def test_numpy_integer_horizon_is_an_int():
    # Stored as a Python int: the horizon is a static shape.
    env = diffenvs.make("hiv", horizon=np.int64(10))
    assert type(env.horizon) is int and env.horizon == 10
    assert env.predict(env.initial_state(), jnp.zeros((10, 1))).shape == (10, 3)


@pytest.mark.parametrize(
    "value, error, expected",
    [
        ("ten", TypeError, "must be a real number, got 'ten'"),
        (None, TypeError, "must be a real number, got None"),
        (1 + 2j, TypeError, "must be a real number"),
        (jnp.ones(3), ValueError, r"must be a scalar, got an array of shape \(3,\)"),
        (float("nan"), ValueError, "must be finite, got nan"),
        (float("inf"), ValueError, "must be finite, got inf"),
    ],
    ids=["string", "none", "complex", "vector", "nan", "inf"],
)
def test_bad_constant_is_named_at_construction(value, error, expected):
    with pytest.raises(error, match=r"s \(a constant of HIV\) " + expected):
        diffenvs.make("hiv", horizon=HORIZON, s=value)
    # Every task checks its constants the same way.
    for name in BUILTIN:
        env = diffenvs.make(name, horizon=HORIZON)
        constant = next(
            f.name for f in dataclasses.fields(env) if f.metadata.get("constant")
        )
        with pytest.raises(error, match=f"{constant} \\(a constant of"):
            diffenvs.make(name, horizon=HORIZON, **{constant: value})


def test_traced_constant_is_accepted():
    # A constant built inside `jax.grad` is a tracer: its shape is checked, its
    # value cannot be.
    actions = jnp.zeros((HORIZON, 1))

    def episode_return(s):
        return diffenvs.make("hiv", horizon=HORIZON, s=s).episode_return(actions)

    assert np.isfinite(jax.grad(episode_return)(10.0))
    with pytest.raises(ValueError, match="must be a scalar"):
        jax.grad(lambda s: episode_return(jnp.full(2, s)))(10.0)


def test_factory_mistakes_are_reported_as_such(monkeypatch):
    # Registered into a copy of the registry, so no other test sees these tasks.
    registry = diffenvs._registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(TypeError, match="factory must accept the horizon as a keyword"):
        diffenvs.register("test_no_horizon", lambda steps: None)
    assert "test_no_horizon" not in diffenvs.names()

    def failing(horizon, scale=1.0):
        return diffenvs.HIV(horizon=horizon, s=scale * jnp.ones(2))

    diffenvs.register("test_failing_factory", failing)
    # The factory's own error, with a note saying which call raised it.
    with pytest.raises(ValueError, match="must be a scalar") as info:
        diffenvs.make("test_failing_factory", horizon=HORIZON, scale=2.0)
    assert any(
        "factory of task 'test_failing_factory', called with horizon=10, scale=2.0"
        in note
        for note in info.value.__notes__
    )
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['scal'\]"):
        diffenvs.make("test_failing_factory", horizon=HORIZON, scal=2.0)


def test_unknown_option_is_named():
    for name in BUILTIN:
        with pytest.raises(TypeError, match=r"unknown option\(s\) \['bogus'\]"):
            diffenvs.make(name, horizon=HORIZON, bogus=1.0)
    # The message lists the options that do exist.
    with pytest.raises(TypeError, match="mortality"):
        diffenvs.make("harvest", horizon=HORIZON, mortaility=0.3)


@pytest.mark.parametrize(
    "solver",
    [diffrax.ImplicitEuler(), diffrax.Kvaerno5()],
    ids=lambda solver: type(solver).__name__,
)
def test_implicit_solver(solver):
    with pytest.raises(ValueError, match="implicit solver"):
        diffenvs.make("cancer", horizon=HORIZON, solver=solver)
    with pytest.raises(ValueError, match="implicit solver"):
        diffenvs.make("double_pendulum", horizon=HORIZON, solver=solver)


def test_solver_that_is_not_a_single_term_ode_solver():
    with pytest.raises(TypeError, match="Diffrax solver instance"):
        diffenvs.make("cancer", horizon=HORIZON, solver="euler")
    with pytest.raises(TypeError, match="Diffrax solver instance"):
        diffenvs.make("cancer", horizon=HORIZON, solver=diffrax.Euler)
    # A solver for a pair of terms (a partitioned system) cannot step one ODE.
    with pytest.raises(ValueError, match="single ODE term"):
        diffenvs.make("cancer", horizon=HORIZON, solver=diffrax.SemiImplicitEuler())


def test_register_rejects_bad_input():
    with pytest.raises(TypeError, match="non-empty str"):
        diffenvs.register("", diffenvs.Cancer)
    with pytest.raises(TypeError, match="callable"):
        diffenvs.register("test_not_callable", 3)
    with pytest.raises(ValueError, match="already registered"):
        diffenvs.register("cancer", diffenvs.Timber)
    # Nothing above may have changed the registry.
    assert diffenvs.names()[: len(BUILTIN)] == BUILTIN
    assert type(diffenvs.make("cancer", horizon=HORIZON)) is diffenvs.Cancer


def test_factory_that_does_not_return_a_task():
    # The factory only misbehaves when asked to, so that what stays registered is
    # a valid task for any later test that builds every registered name.
    def factory(horizon, *, broken=False):
        return "not a task" if broken else diffenvs.Cancer(horizon)

    diffenvs.register("test_errors_factory", factory, overwrite=True)
    with pytest.raises(TypeError, match="expected an AbstractEnv"):
        diffenvs.make("test_errors_factory", horizon=HORIZON, broken=True)
    assert isinstance(
        diffenvs.make("test_errors_factory", horizon=HORIZON), diffenvs.Cancer
    )


# ---- shapes ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cancer", "invasive_plant"])
def test_actions_of_the_wrong_shape(name):
    env = diffenvs.make(name, horizon=HORIZON)
    s1, m = env.initial_state(), env.action_dim
    expected = rf"actions must have shape \(horizon, action_dim\) = \({HORIZON}, {m}\)"
    for shape in [(HORIZON + 1, m), (HORIZON, m + 1), (HORIZON,), (2, HORIZON, m)]:
        with pytest.raises(ValueError, match=expected):
            env.predict(s1, jnp.zeros(shape))
        with pytest.raises(ValueError, match=expected):
            env.rewards(s1, jnp.zeros(shape))
        with pytest.raises(ValueError, match=expected):
            env.episode_return(jnp.zeros(shape))
    # A batch is the one a user is most likely to pass; the message says what to do.
    with pytest.raises(ValueError, match="batch with jax.vmap"):
        env.predict(s1, jnp.zeros((2, HORIZON, m)))


@pytest.mark.parametrize("name", ["cancer", "invasive_plant"])
def test_initial_state_of_the_wrong_shape(name):
    env = diffenvs.make(name, horizon=HORIZON)
    n = env.state_dim
    actions = jnp.zeros((HORIZON, env.action_dim))
    for shape in [(n + 1,), (), (1, n)]:
        with pytest.raises(ValueError, match=rf"s1 must have shape .* = \({n},\)"):
            env.predict(jnp.zeros(shape), actions)


@pytest.mark.parametrize("name", ["cancer", "invasive_plant"])
def test_step_action_of_the_wrong_shape(name):
    env = diffenvs.make(name, horizon=HORIZON)
    m = env.action_dim
    for shape in [(), (m + 1,), (1, m)]:
        with pytest.raises(ValueError, match=rf"action must have shape .* = \({m},\)"):
            env.step(env.reset(), jnp.zeros(shape))


def test_policy_returning_the_wrong_shape():
    env = diffenvs.make("invasive_plant", horizon=HORIZON)
    with pytest.raises(ValueError, match=r"policy must return an action of shape"):
        env.rollout(lambda observation, key: jnp.zeros(3), jr.key(0))


# ---- bad data under jit and vmap ---------------------------------------------------


@pytest.fixture(scope="module")
def cancer():
    return diffenvs.make("cancer", horizon=HORIZON)


def test_nan_actions_raise_under_jit(cancer):
    actions = jnp.zeros((HORIZON, 1)).at[3, 0].set(jnp.nan)
    with pytest.raises(EquinoxRuntimeError, match="cancer: actions contain NaN"):
        jit_evaluate(cancer, cancer.initial_state(), actions)
    with pytest.raises(EquinoxRuntimeError, match="cancer: actions contain NaN"):
        eqx.filter_jit(cancer.episode_return)(actions)
    with pytest.raises(EquinoxRuntimeError, match="cancer: action contains NaN"):
        eqx.filter_jit(cancer.step)(cancer.reset(), jnp.array([jnp.nan]))
    with pytest.raises(EquinoxRuntimeError, match="cancer: actions contain NaN"):
        eqx.filter_jit(cancer.rollout)(Replay(actions), jr.key(0))


def _batch_with_one_nan(env):
    return uniform_actions(jr.key(0), env, batch=(4,)).at[2, 5, 0].set(jnp.nan)


def test_nan_actions_raise_under_vmap(cancer):
    # One bad row in a batch is enough.
    evaluate = jax.vmap(jit_evaluate, in_axes=(None, None, 0))
    with pytest.raises(EquinoxRuntimeError, match="cancer: "):
        evaluate(cancer, cancer.initial_state(), _batch_with_one_nan(cancer))


# Under vmap, Equinox reports the message of the largest index raised anywhere in
# the batch, so the NaN message must outrank the divergence message.
def test_nan_actions_under_vmap_are_named(cancer):
    evaluate = jax.vmap(jit_evaluate, in_axes=(None, None, 0))
    with pytest.raises(EquinoxRuntimeError, match="cancer: actions contain NaN"):
        evaluate(cancer, cancer.initial_state(), _batch_with_one_nan(cancer))


def test_diverging_integration_raises(cancer):
    # From x = 0 the tumour's growth term r x ln(1 / x) is 0 * inf = NaN.
    actions = jnp.zeros((HORIZON, 1))
    with pytest.raises(EquinoxRuntimeError, match="the integration diverged"):
        jit_evaluate(cancer, jnp.zeros(1), actions)
    # A constant large enough to overflow float32 within a few steps: harvest has
    # no state bounds to hide it.
    harvest = diffenvs.make("harvest", horizon=HORIZON, mortality=1e30)
    with pytest.raises(EquinoxRuntimeError, match=r"diverged .* horizon=10, dt=1"):
        jit_evaluate(harvest, harvest.initial_state(), actions)


@pytest.mark.parametrize("value", [jnp.nan, jnp.inf], ids=["nan", "inf"])
def test_non_finite_initial_state_is_named(cancer, value):
    """Bad input, not a diverged integration: the message says so, under jit, in
    a gradient alone and from the step interface."""
    s1 = cancer.initial_state().at[0].set(value)
    actions = jnp.zeros((HORIZON, 1))
    message = "cancer: the state given .* is not finite"
    with pytest.raises(EquinoxRuntimeError, match=message):
        jit_evaluate(cancer, s1, actions)
    with pytest.raises(EquinoxRuntimeError, match=message):
        eqx.filter_jit(jax.grad(lambda s: jnp.sum(cancer.rewards(s, actions))))(s1)
    with pytest.raises(EquinoxRuntimeError, match=message):
        state = diffenvs.EnvState(s1, jnp.zeros((), jnp.int32))
        eqx.filter_jit(cancer.step)(state, jnp.zeros(1))


def test_lower_precision_inputs_are_promoted_under_x64(x64):
    # A float32 or integer s1 and float32 actions under x64 run in float64 (the
    # time loop's carry needs one type).
    env = diffenvs.make("hiv", horizon=HORIZON)
    actions = jnp.zeros((HORIZON, 1), jnp.float32)
    want = env.predict(env.initial_state(), actions.astype(jnp.float64))
    for s1 in (env.initial_state().astype(jnp.float32), jnp.array([800, 0, 1])):
        got = env.predict(s1, actions)
        assert got.dtype == jnp.float64
        if s1.dtype == jnp.float32:
            np.testing.assert_allclose(got, want, rtol=1e-6)


# A return linear in the state (hiv: A T - (1 - u)^2) needs no saved state for its
# backward pass, so a check on the states alone is dead code in a gradient-only
# computation and would vanish: the derivatives must carry the check themselves.
@pytest.mark.parametrize("name", ["hiv", "invasive_plant"])
def test_nan_actions_raise_in_a_gradient_alone(name):
    env = diffenvs.make(name, horizon=100)
    actions = jnp.zeros((env.horizon, env.action_dim)).at[3, 0].set(jnp.nan)
    message = f"{name}: actions contain NaN"
    with pytest.raises(EquinoxRuntimeError, match=message):
        eqx.filter_jit(jax.grad(lambda a: env.episode_return(a)))(actions)
    with pytest.raises(EquinoxRuntimeError, match=message):
        eqx.filter_jit(jax.vmap(jax.grad(lambda a: env.episode_return(a))))(
            jnp.stack([jnp.zeros_like(actions), actions])
        )
    with pytest.raises(EquinoxRuntimeError, match=message):
        eqx.filter_jit(jax.jacfwd(lambda a: env.predict(env.initial_state(), a)))(
            actions
        )
    with pytest.raises(EquinoxRuntimeError, match=f"{name}: action contains NaN"):
        eqx.filter_jit(jax.grad(lambda a: env.step(env.reset(), a)[1]))(actions[3])


def test_divergence_raises_in_a_gradient_alone():
    harvest = diffenvs.make("harvest", horizon=HORIZON, mortality=1e30)
    with pytest.raises(EquinoxRuntimeError, match="the integration diverged"):
        eqx.filter_jit(jax.grad(lambda a: harvest.episode_return(a)))(
            jnp.zeros((HORIZON, 1))
        )


def test_step_past_the_horizon_raises_in_a_gradient_alone(cancer):
    finished = diffenvs.EnvState(cancer.initial_state(), jnp.array(HORIZON))
    with pytest.raises(EquinoxRuntimeError, match="finished episode"):
        eqx.filter_jit(jax.grad(lambda a: cancer.step(finished, a)[1]))(jnp.zeros(1))


# The control tasks check only their final state for divergence, which is enough if a
# step's non-finite result never turns finite again. Inject one into the middle of an
# episode and follow it to the end, for every task, solver, dimension and kind.
@pytest.mark.parametrize(
    "solver", [diffrax.Euler(), diffrax.Heun()], ids=["Euler", "Heun"]
)
@pytest.mark.parametrize("name", diffenvs.CONTROL_TASKS)
@given(data=st.data())
def test_a_nonfinite_state_persists_to_the_end(name, solver, data):
    env = diffenvs.make(name, horizon=HORIZON, solver=solver)
    assert env._nonfinite_persists
    dim = data.draw(st.integers(0, env.state_dim - 1), label="dimension")
    # A step's result is clipped to the box, so it can only be infinite towards a
    # side without a bound.
    kinds = [jnp.nan]
    if env.x_hi is None or np.isinf(env.x_hi[dim]):
        kinds.append(jnp.inf)
    if env.x_lo is None or np.isinf(env.x_lo[dim]):
        kinds.append(-jnp.inf)
    value = data.draw(st.sampled_from(kinds), label="value")
    start = data.draw(st.integers(1, HORIZON - 1), label="step")
    actions = uniform_actions(jr.key(data.draw(st.integers(0, 3))), env)
    # As arrays, so that one compilation serves every example.
    final = _continue_after_injection(
        env, actions, jnp.asarray(start), jnp.asarray(dim), jnp.asarray(value)
    )
    assert not jnp.all(jnp.isfinite(final))


@eqx.filter_jit
def _continue_after_injection(env, actions, start, dim, value):
    """The final state when x_start's dimension `dim` is set to `value`."""
    states = env.predict(env.initial_state(), actions)
    state = states[start - 1].at[dim].set(value)

    def step(k, state):
        return env.transition(k, state, actions[k])

    return jax.lax.fori_loop(start, HORIZON, step, state)


def test_a_task_with_its_own_step_is_checked_at_every_step():
    """A step of a task's own may let a NaN vanish: it gets the per-step check."""

    class Forgetful(diffenvs.AbstractEnv):
        name: ClassVar[str] = "test_forgetful"
        state_dim: ClassVar[int] = 1
        action_dim: ClassVar[int] = 1

        @property
        def dt(self) -> float:
            return 1.0

        def initial_state(self):
            return jnp.zeros(1)

        def transition_and_reward(self, step, state, action):
            # A NaN at the second step only, forgotten at the third.
            next_state = jnp.where(step == 1, jnp.nan, state + action)
            return jnp.where(step == 2, 1.0, next_state), jnp.sum(state)

        def terminal_reward(self, final_state):
            return jnp.zeros(())

        def reference_actions(self):
            return None

    env = Forgetful(horizon=HORIZON)
    assert not env._nonfinite_persists
    with pytest.raises(EquinoxRuntimeError, match="diverged"):
        jit_evaluate(env, env.initial_state(), jnp.zeros((HORIZON, 1)))


@pytest.mark.parametrize("method", ["transition", "transition_and_reward"])
def test_a_control_task_cannot_replace_its_step(method):
    """A control task's step is the family's (its NaN check relies on it); one of
    its own is refused at class creation, pointing to `AbstractEnv`."""
    harvest = type(diffenvs.make("harvest", horizon=HORIZON))
    with pytest.raises(TypeError, match=f"defines {method}.*AbstractEnv"):
        type("Forgetful", (harvest,), {method: lambda self, *args: args[1]})


def test_nan_initial_state_raises(cancer):
    with pytest.raises(EquinoxRuntimeError, match="cancer"):
        jit_evaluate(cancer, jnp.array([jnp.nan]), jnp.zeros((HORIZON, 1)))


# ---- not errors ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cancer", "invasive_plant"])
def test_actions_outside_the_box_are_clipped_not_rejected(name):
    env = diffenvs.make(name, horizon=HORIZON)
    s1 = env.initial_state()
    actions = 5.0 * uniform_actions(jr.key(1), env)
    actions = actions.at[0].set(jnp.inf).at[1].set(-jnp.inf)
    clipped = jnp.clip(actions, -1.0, 1.0)
    got, expected = jit_evaluate(env, s1, actions), jit_evaluate(env, s1, clipped)
    for a, b in zip(got[:3], expected[:3], strict=True):
        # The same compiled function on identical inputs once clipped: exact.
        np.testing.assert_array_equal(a, b)
    assert jnp.all(jnp.isfinite(got[0]))
