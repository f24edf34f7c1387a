"""The contract that every world model honours.

Parametrised over `worldmodels.names()`, read when this module is collected, so a
newly registered configuration is covered without editing this file; plus a
user's own model (`LinearAWM`, an `eqx.Module` that implements `predict` and
nothing else) and the simulator itself (`worldmodels.Simulator`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import EquinoxRuntimeError, assert_close
from hypothesis import given, strategies as st
from jaxtyping import Array, Float

import diffenvs
import worldmodels

# invasive_plant has 5 state and 5 action dimensions, so every reshaping of states
# and actions is exercised; 12 steps keep compilation cheap.
TASK = "invasive_plant"
HORIZON = 12

# Two float32 evaluations of the same model compiled differently (eagerly, under
# jit, in a scan, in parallel over time, under vmap) differ by rounding: a few
# units in the last place (6e-8) per operation, accumulated over 2 layers and 12
# steps. 1e-5 of each column's magnitude is far above that and far below any
# modelling error.
FLOAT32_RTOL = 1e-5


class LinearAWM(eqx.Module):
    """A user's own model: s_{t+1} = s1 + B (a_1 + ... + a_t). It implements
    `predict` only, so it relies on the default incremental interface."""

    b: Float[Array, "state action"]

    def predict(self, s1, actions):
        return s1 + jnp.cumsum(actions, axis=0) @ self.b.T


MODELS = (*worldmodels.names(), "user", "simulator")


def build(name: str, env: diffenvs.AbstractEnv):
    if name == "user":
        return LinearAWM(jr.normal(jr.key(1), (env.state_dim, env.action_dim)))
    if name == "simulator":
        return worldmodels.Simulator(env)
    return worldmodels.make(name, env, key=jr.key(1))


@pytest.fixture(scope="module")
def env():
    return diffenvs.make(TASK, horizon=HORIZON)


@pytest.fixture(scope="module", params=MODELS)
def model(request, env):
    return build(request.param, env)


def random_actions(key, env, batch=()):
    return jr.uniform(key, (*batch, env.horizon, env.action_dim), minval=-1, maxval=1)


@eqx.filter_jit
def jit_predict(model, s1, actions):
    return model.predict(s1, actions)


@eqx.filter_jit
def jit_unroll(model, s1, actions):
    return worldmodels.unroll(model, s1, actions)


@eqx.filter_jit
def jit_jacobian(model, s1, actions):
    return jax.jacrev(model.predict, argnums=1)(s1, actions)


def test_shapes(model, env, key):
    states = jit_predict(model, env.initial_state(), random_actions(key, env))
    assert states.shape == (env.horizon, env.state_dim)
    assert states.dtype == jnp.float32


@given(first=st.integers(0, HORIZON - 1), seed=st.integers(0, 2**31 - 1))
def test_causal(model, env, first, seed):
    """Changing actions first, first + 1, ... changes no earlier prediction."""
    actions = random_actions(jr.key(0), env)
    changed = actions.at[first:].set(random_actions(jr.key(seed), env)[first:])
    s1 = env.initial_state()
    before = jit_predict(model, s1, actions)
    after = jit_predict(model, s1, changed)
    # Exactly equal: a masked attention weight is exp(-inf) = 0, and every earlier
    # row runs the same arithmetic on the same inputs.
    np.testing.assert_array_equal(before[:first], after[:first])


def test_jacobian_is_causal(model, env, key):
    """d s_t / d a_k vanishes exactly for k > t and not for every k <= t."""
    jacobian = jit_jacobian(model, env.initial_state(), random_actions(key, env))
    # shape (time, state, time, action): put the two time axes first.
    norms = np.linalg.norm(np.asarray(jacobian).transpose(0, 2, 1, 3), axis=(2, 3))
    future = np.triu(np.ones((HORIZON, HORIZON), bool), k=1)
    assert np.all(norms[future] == 0.0)
    assert np.all(np.isfinite(norms))
    assert np.count_nonzero(norms[~future]) > 0


def test_jit_equals_eager(model, env, key):
    s1, actions = env.initial_state(), random_actions(key, env)
    assert_close(
        jit_predict(model, s1, actions), model.predict(s1, actions), rtol=FLOAT32_RTOL
    )


def test_jit_of_the_bound_method(model, env, key):
    """`jax.jit(model.predict)`: a model hashes by value, so jit caches on the
    bound method with the weights as constants; new weights are a new program."""
    if not isinstance(model, worldmodels.AbstractWorldModel):
        pytest.skip("the user's model is a plain eqx.Module, hashed by Equinox")
    s1, actions = env.initial_state(), random_actions(key, env)
    assert_close(
        jax.jit(model.predict)(s1, actions), model.predict(s1, actions),
        rtol=FLOAT32_RTOL,
    )  # fmt: skip
    moved = jax.tree.map(lambda x: x * 1.1 if eqx.is_inexact_array(x) else x, model)
    if moved != model:
        assert hash(moved) != hash(model)
        assert_close(
            jax.jit(moved.predict)(s1, actions), moved.predict(s1, actions),
            rtol=FLOAT32_RTOL,
        )  # fmt: skip


def test_vmap_equals_loop(model, env, key):
    actions = random_actions(key, env, batch=(3,))
    s1 = jnp.broadcast_to(env.initial_state(), (3, env.state_dim))
    batched = eqx.filter_jit(jax.vmap(lambda m, s, a: m.predict(s, a), (None, 0, 0)))
    looped = jnp.stack([jit_predict(model, s1[i], actions[i]) for i in range(3)])
    assert_close(batched(model, s1, actions), looped, rtol=FLOAT32_RTOL)


def test_gradients_are_finite(model, env, key):
    s1, actions = env.initial_state(), random_actions(key, env)

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(inputs):
        model, actions = inputs
        return jnp.mean(jnp.square(model.predict(s1, actions)))

    model_grad, action_grad = grads((model, actions))
    assert np.all(np.isfinite(action_grad)) and np.any(action_grad != 0)
    leaves = jax.tree.leaves(model_grad)
    if name_of(model) != "simulator":
        assert leaves, "a learned model has parameters"
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)


def test_incremental_equals_predict(model, env, key):
    s1, actions = env.initial_state(), random_actions(key, env)
    assert_close(
        jit_unroll(model, s1, actions),
        jit_predict(model, s1, actions),
        rtol=FLOAT32_RTOL,
    )


def test_default_incremental_equals_predict(model, env, key):
    """The predict-only default works for every model, not only the user's."""
    s1, actions = env.initial_state(), random_actions(key, env)
    default = worldmodels.PredictOnly(model, env.action_dim)
    assert_close(
        jit_unroll(default, s1, actions),
        jit_predict(model, s1, actions),
        rtol=FLOAT32_RTOL,
    )


def test_no_retrace(model, env, key):
    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def predict(model, s1, actions):
        return model.predict(s1, actions)

    first, second = jr.split(key)
    predict(model, env.initial_state(), random_actions(first, env))
    other = jax.tree.map(lambda x: x * 1.5 if eqx.is_inexact_array(x) else x, model)
    predict(other, 2.0 * env.initial_state(), random_actions(second, env))


def test_nan_actions_raise(model, env, key):
    if name_of(model) == "user":
        pytest.skip("the user's model makes no promise about NaN")
    actions = random_actions(key, env).at[3, 0].set(jnp.nan)
    with pytest.raises(EquinoxRuntimeError, match="NaN"):
        jax.block_until_ready(jit_predict(model, env.initial_state(), actions))

    # A gradient alone: the check must not be dead code there.
    @eqx.filter_jit
    def grad(model, s1, actions):
        return jax.grad(lambda a: jnp.sum(model.predict(s1, a) ** 2))(actions)

    with pytest.raises(EquinoxRuntimeError, match="NaN"):
        jax.block_until_ready(grad(model, env.initial_state(), actions))


def test_actions_outside_the_box_act_as_clipped(model, env, key):
    """One rule for every model and task: actions are clipped to [-1, 1], so an
    action of 100 or inf is an action of 1, through `predict` and step by step."""
    if name_of(model) == "user":
        pytest.skip("the user's model makes no promise about clipping")
    inside = random_actions(key, env)
    outside = inside.at[2].set(100.0).at[4].set(-jnp.inf).at[5, 0].set(jnp.inf)
    clipped = jnp.clip(outside, -1.0, 1.0)
    s1 = env.initial_state()
    assert_close(
        jit_predict(model, s1, outside), jit_predict(model, s1, clipped),
        rtol=FLOAT32_RTOL,
    )  # fmt: skip
    assert_close(
        jit_unroll(model, s1, outside), jit_unroll(model, s1, clipped),
        rtol=FLOAT32_RTOL,
    )  # fmt: skip


def test_non_finite_initial_state_raises(model, env, key):
    if name_of(model) == "user":
        pytest.skip("the user's model makes no promise about NaN")
    actions = random_actions(key, env)
    for value in (jnp.nan, jnp.inf):
        s1 = env.initial_state().at[0].set(value)
        with pytest.raises(EquinoxRuntimeError, match="not finite"):
            jax.block_until_ready(jit_predict(model, s1, actions))
        with pytest.raises(EquinoxRuntimeError, match="not finite"):
            jax.block_until_ready(jit_unroll(model, s1, actions))


@eqx.filter_jit
def jit_vmap_predict(model, s1, actions):
    return jax.vmap(model.predict, in_axes=(None, 0))(s1, actions)


@eqx.filter_jit
def jit_grad_s1(model, s1, actions):
    return jax.grad(lambda s: jnp.sum(model.predict(s, actions) ** 2))(s1)


def test_run_time_checks_hold_under_vmap_and_in_a_gradient(model, env, key):
    """The checks of the two tests above also fire for one member of a vmapped
    batch, and in a gradient with respect to the initial state alone."""
    if name_of(model) == "user":
        pytest.skip("the user's model makes no promise about NaN")
    actions = random_actions(key, env, (2,))
    s1 = env.initial_state()
    with pytest.raises(EquinoxRuntimeError, match="NaN"):
        jax.block_until_ready(
            jit_vmap_predict(model, s1, actions.at[1, 3, 0].set(jnp.nan))
        )
    with pytest.raises(EquinoxRuntimeError, match="not finite"):
        jax.block_until_ready(jit_grad_s1(model, s1.at[0].set(jnp.inf), actions[0]))


def test_other_task_sizes_fail_clearly(model, env, key):
    if name_of(model) == "user":
        pytest.skip("the user's model makes no promise about wrong sizes")
    other = diffenvs.make("hiv", horizon=HORIZON)
    with pytest.raises(ValueError, match="s1 must have shape"):
        model.predict(other.initial_state(), random_actions(key, env))
    with pytest.raises(ValueError, match="action"):
        model.predict(env.initial_state(), random_actions(key, other))


def test_longer_horizon_fails_clearly(model, env, key):
    if name_of(model) == "user":
        pytest.skip("the user's model accepts any horizon")
    longer = jr.uniform(key, (HORIZON + 1, env.action_dim))
    with pytest.raises(ValueError, match="horizon"):
        model.predict(env.initial_state(), longer)


def test_shorter_horizon_is_a_prefix(model, env, key):
    if name_of(model) == "simulator":
        pytest.skip("a task's horizon is fixed")
    s1, actions = env.initial_state(), random_actions(key, env)
    full = jit_predict(model, s1, actions)
    prefix = jit_predict(model, s1, actions[:5])
    assert_close(prefix, full[:5], rtol=FLOAT32_RTOL)


def name_of(model) -> str:
    if isinstance(model, LinearAWM):
        return "user"
    if isinstance(model, worldmodels.Simulator):
        return "simulator"
    return "learned"


def test_teacher_forced_on_own_predictions_equals_predict(model, env, key):
    """Fed its own predictions as the true history, a model that reads states
    (HWM, Markov) predicts them again: the parallel teacher-forced form and the
    step-by-step `predict` are the same function."""
    if not isinstance(model, worldmodels.TeacherForced):
        pytest.skip("the model has no teacher-forced form")
    s1, actions = env.initial_state(), random_actions(key, env)
    states = jit_predict(model, s1, actions)
    forced = eqx.filter_jit(model.teacher_forced)(s1, actions, states)
    assert_close(forced, states, rtol=FLOAT32_RTOL)


@pytest.mark.parametrize("name", worldmodels.names())
def test_incremental_equals_predict_in_float64(x64, name):
    """In float64 the two forms agree to rounding: the same inputs (the time
    feature included) reach the same arithmetic."""
    env = diffenvs.make(TASK, horizon=HORIZON)
    model = worldmodels.make(name, env, key=jr.key(1))
    actions = jr.uniform(jr.key(2), (HORIZON, env.action_dim), minval=-1, maxval=1)
    s1 = env.initial_state()
    assert_close(
        jit_unroll(model, s1, actions), jit_predict(model, s1, actions), rtol=1e-12
    )
