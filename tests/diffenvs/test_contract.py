"""The contract that every registered task honours.

Each test is parametrised over `diffenvs.names()`, read when this module is
collected, so a newly registered task is covered without editing this file. A task
written the way a user writes one (`LinearSystem` below, registered through
`diffenvs.register`) runs through the same checks.
"""

from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import (
    EquinoxRuntimeError,
    Replay,
    assert_close,
    central_differences,
    jit_evaluate,
    jit_rollout,
    jit_step,
    make_float64,
    scale_constants,
    uniform_actions,
)
from hypothesis import given, strategies as st
from jaxtyping import Array, Float, Scalar

import diffenvs

# One horizon for every task keeps the number of compiled shapes down. It is the
# smallest of the usual horizons at which every task's explicit steps stay finite
# with Euler, Heun and Tsit5: at H = 8, for example, a Heun stage of `cancer`
# (dt = 2.5) leaves the domain x > 0 of its logarithm, which is a discretisation
# too coarse for the task rather than a broken contract.
HORIZON = 20

# Relative tolerance for comparing two float32 evaluations of the same computation
# compiled differently (eagerly, under jit, inside a scan or a vmap). XLA may fuse
# and contract (FMA) operations differently in each, so results differ by a few
# units in the last place (about 6e-8 relative) per operation; over 20 steps that
# stays two orders of magnitude below 1e-5 of each quantity's magnitude.
FLOAT32_RTOL = 1e-5


class LinearSystem(diffenvs.AbstractControlTask):
    """A user's own task: a damped rotation driven through its second coordinate,
    x' = A x + b u, with running cost |x|^2 + effort u^2 and terminal cost
    |x_H|^2."""

    damping: Float[Array, ""] = eqx.field(default=0.5, converter=jnp.asarray)
    effort: Float[Array, ""] = eqx.field(default=0.1, converter=jnp.asarray)

    name: ClassVar[str] = "test_user_linear_system"
    state_dim: ClassVar[int] = 2
    action_dim: ClassVar[int] = 1
    duration: ClassVar[float] = 2.0
    x0: ClassVar[tuple[float, ...]] = (1.0, 0.0)
    u_lo: ClassVar[tuple[float, ...]] = (-2.0,)
    u_hi: ClassVar[tuple[float, ...]] = (2.0,)

    def matrix(self) -> Float[Array, "2 2"]:
        return jnp.array([[-self.damping, 1.0], [-1.0, -self.damping]])

    def vector_field(self, t, x, u) -> Float[Array, " state"]:
        return self.matrix() @ x + jnp.stack([jnp.zeros_like(u[0]), u[0]])

    def running_cost(self, t, x, u) -> Scalar:
        return jnp.sum(x**2) + self.effort * u[0] ** 2

    def terminal_cost(self, x) -> Scalar:
        return jnp.sum(x**2)


USER_TASK = LinearSystem.name
# The user's task is registered by the fixture below, when its tests run, not at
# import: registering here would put it into `names()` for whichever modules
# happen to be collected after this one, and make their parametrisation depend on
# the collection order.
TASKS = tuple(dict.fromkeys((*diffenvs.names(), USER_TASK)))


@pytest.fixture(scope="module", params=TASKS)
def task_name(request) -> str:
    if request.param == USER_TASK:
        diffenvs.register(USER_TASK, LinearSystem, overwrite=True)
    return request.param


@pytest.fixture(scope="module")
def env(task_name) -> diffenvs.AbstractEnv:
    return diffenvs.make(task_name, horizon=HORIZON)


def test_shapes_and_dtypes(env):
    # Shapes and dtypes are a property of the traced program, so they are read off
    # `eval_shape` without compiling; that the values are right is the business of
    # the tests below.
    n, m, h = env.state_dim, env.action_dim, env.horizon
    f32, i32 = jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)
    s1 = env.initial_state()
    assert s1.shape == (n,) and s1.dtype == f32
    actions = uniform_actions(jr.key(0), env)

    def spec(fn, *args):
        out = eqx.filter_eval_shape(fn, *args)
        return jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), out)

    assert spec(env.predict, s1, actions) == ((h, n), f32)
    assert spec(env.rewards, s1, actions) == ((h,), f32)
    assert spec(env.episode_return, actions) == ((), f32)

    env_state = env.reset(jr.key(1))
    assert isinstance(env_state, diffenvs.EnvState)
    assert (env_state.state.shape, env_state.state.dtype) == ((n,), f32)
    assert (env_state.step.shape, env_state.step.dtype) == ((), i32)
    assert spec(env.observe, env_state) == ((n + 1,), f32)
    next_state, reward, done = eqx.filter_eval_shape(env.step, env_state, actions[0])
    assert isinstance(next_state, diffenvs.EnvState)
    assert (next_state.state.shape, next_state.state.dtype) == ((n,), f32)
    assert (next_state.step.shape, next_state.step.dtype) == ((), i32)
    assert (reward.shape, reward.dtype) == ((), f32)
    assert (done.shape, done.dtype) == ((), jnp.dtype(jnp.bool_))

    rollout = eqx.filter_eval_shape(env.rollout, Replay(actions), jr.key(2))
    assert isinstance(rollout, diffenvs.Rollout)
    assert (rollout.observations.shape, rollout.observations.dtype) == (
        (h, n + 1),
        f32,
    )
    assert (rollout.actions.shape, rollout.actions.dtype) == ((h, m), f32)
    assert (rollout.states.shape, rollout.states.dtype) == ((h, n), f32)
    assert (rollout.rewards.shape, rollout.rewards.dtype) == ((h,), f32)


def test_grad_equals_central_differences(task_name, x64):
    env = make_float64(task_name, HORIZON)
    eps = 1e-5
    finite_differences = eqx.filter_jit(
        lambda env, actions: central_differences(env.episode_return, actions, eps)
    )
    # Points drawn inside [-0.8, 0.8] stay away from the clipping at +-1, and for
    # these keys away from one_bounce's kink at a_0 = -0.5 (a_0 = -0.13, -0.61).
    for seed in (0, 1):
        actions = uniform_actions(jr.key(seed), env, -0.8, 0.8)
        assert actions.dtype == jnp.float64
        *_, grad = jit_evaluate(env, env.initial_state(), actions)
        expected = finite_differences(env, actions)
        assert grad.dtype == jnp.float64
        # Every task's return depends on its actions, so an all-zero gradient would
        # mean the gradient path is cut, and the comparison below vacuous.
        assert jnp.any(grad != 0)
        # Central differences with eps = 1e-5 in float64: the truncation error is
        # eps^2 |J'''| / 6 (the worst measured, hiv, about 4e-7 for gradients of
        # order 40) and the rounding error about 1e-16 |J| / eps < 1e-8; 1e-6 of
        # the gradient's scale leaves a margin of about 100.
        scale = 1.0 + float(jnp.max(jnp.abs(expected)))
        np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-6 * scale)


def test_jit_equals_eager(env):
    s1 = env.initial_state()
    for seed in (12, 13):
        actions = uniform_actions(jr.key(seed), env)
        eager = env.rewards(s1, actions)
        _, jitted, _, _ = jit_evaluate(env, s1, actions)
        assert_close(jitted, eager, rtol=FLOAT32_RTOL)


def test_jit_of_bound_methods(env):
    """The gymnax idiom `jax.jit(env.step)`: a task hashes by value, so jit caches
    on the bound method; a task with other constants is another program."""
    s1 = env.initial_state()
    actions = uniform_actions(jr.key(14), env)
    state = jax.jit(env.reset)(jr.key(0))
    assert_close(state.state, env.reset(jr.key(0)).state, rtol=0)
    got = jax.jit(env.step)(state, actions[0])
    want = env.step(state, actions[0])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jnp.issubdtype(w.dtype, jnp.inexact):
            assert_close(jnp.atleast_1d(g), jnp.atleast_1d(w), rtol=FLOAT32_RTOL)
        else:
            np.testing.assert_array_equal(g, w)
    assert_close(
        jax.jit(env.predict)(s1, actions), env.predict(s1, actions), rtol=FLOAT32_RTOL
    )
    assert_close(
        jax.jit(env.rewards)(s1, actions), env.rewards(s1, actions), rtol=FLOAT32_RTOL
    )
    # Equal tasks hash alike; new constants give another hash and their own result.
    rebuilt = jax.tree.map(lambda x: x, env)
    assert rebuilt == env and hash(rebuilt) == hash(env)
    other = scale_constants(env, 1.05)
    if other != env:
        assert hash(other) != hash(env)
        assert_close(
            jax.jit(other.rewards)(s1, actions),
            other.rewards(s1, actions),
            rtol=FLOAT32_RTOL,
        )


def test_traced_task_cannot_be_hashed(env):
    def hashed(env):
        return hash(env)

    with pytest.raises(TypeError, match="pass it as an argument"):
        eqx.filter_jit(hashed)(env)


def test_vmap_equals_loop(env):
    s1 = env.initial_state()
    batch = uniform_actions(jr.key(3), env, batch=(3,))
    batched = jax.vmap(jit_evaluate, in_axes=(None, None, 0))(env, s1, batch)
    for i, actions in enumerate(batch):
        single = jit_evaluate(env, s1, actions)
        for name, got, expected in zip(
            ("states", "rewards", "return", "grad"), batched, single, strict=True
        ):
            assert_close(
                jnp.atleast_1d(got[i]),
                jnp.atleast_1d(expected),
                rtol=FLOAT32_RTOL,
                err_msg=f"{name} of batch element {i}",
            )


def test_vmap_over_constants_equals_loop(env):
    # The constants are array leaves, so a batch of tasks that differ only in their
    # constants is one vmapped computation.
    tasks = [scale_constants(env, factor) for factor in (1.0, 0.95, 1.05)]
    batched = jax.tree.map(lambda *leaves: jnp.stack(leaves), *tasks)
    s1 = env.initial_state()
    actions = uniform_actions(jr.key(4), env)
    evaluate = eqx.filter_vmap(jit_evaluate, in_axes=(eqx.if_array(0), None, None))
    _, rewards, _, _ = evaluate(batched, s1, actions)
    for i, task in enumerate(tasks):
        _, expected, _, _ = jit_evaluate(task, s1, actions)
        assert_close(rewards[i], expected, rtol=FLOAT32_RTOL)


def test_no_retrace_on_new_values(env, task_name):
    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def return_and_grad(env, s1, actions):
        return jax.value_and_grad(lambda a: jnp.sum(env.rewards(s1, a)))(actions)

    s1 = env.initial_state()
    first = uniform_actions(jr.key(5), env)
    second = uniform_actions(jr.key(6), env)
    value, _ = return_and_grad(env, s1, first)
    # New actions, a freshly built task of the same kind, and new constants: each
    # is new values of the same structure, so none may trigger a second trace
    # (assert_max_traces raises if one does).
    new_value, _ = return_and_grad(env, s1, second)
    return_and_grad(diffenvs.make(task_name, horizon=HORIZON), s1, first)
    return_and_grad(scale_constants(env, 1.05), s1, first)
    assert new_value != value
    assert eqx.debug.get_num_traces(return_and_grad) == 1


def test_step_and_rollout_replay_predict(env):
    h = env.horizon
    s1 = env.initial_state()
    actions = uniform_actions(jr.key(7), env)
    states, rewards, _, _ = jit_evaluate(env, s1, actions)

    env_state = env.reset(jr.key(8))
    np.testing.assert_array_equal(env_state.state, s1)
    assert int(env_state.step) == 0
    stepped_states, stepped_rewards = [], []
    for k in range(h):
        observation = env.observe(env_state)
        np.testing.assert_array_equal(observation[:-1], env_state.state)
        # k / H rounded to float32 once, up to the last place.
        np.testing.assert_allclose(observation[-1], k / h, rtol=1e-7)
        env_state, reward, done = jit_step(env, env_state, actions[k])
        assert int(env_state.step) == k + 1
        assert bool(done) == (k == h - 1), f"done={bool(done)} at step {k}"
        stepped_states.append(env_state.state)
        stepped_rewards.append(reward)
    assert_close(jnp.stack(stepped_states), states, rtol=FLOAT32_RTOL)
    assert_close(jnp.stack(stepped_rewards), rewards, rtol=FLOAT32_RTOL)

    rollout = jit_rollout(env, Replay(actions), jr.key(9))
    np.testing.assert_array_equal(rollout.actions, actions)
    assert_close(rollout.states, states, rtol=FLOAT32_RTOL)
    assert_close(rollout.rewards, rewards, rtol=FLOAT32_RTOL)
    previous = jnp.concatenate([s1[None], rollout.states[:-1]])
    assert_close(rollout.observations[:, :-1], previous, rtol=FLOAT32_RTOL)
    np.testing.assert_allclose(rollout.observations[:, -1], np.arange(h) / h, 1e-7)


def test_step_past_the_horizon_raises(env):
    actions = uniform_actions(jr.key(10), env)
    env_state = env.reset()
    for k in range(env.horizon):
        env_state, _, _ = jit_step(env, env_state, actions[k])
    with pytest.raises(EquinoxRuntimeError, match="finished episode"):
        jit_step(env, env_state, actions[0])
    with pytest.raises(EquinoxRuntimeError, match="finished episode"):
        env.step(env_state, actions[0])


@given(seed=st.integers(0, 2**32 - 1))
def test_episode_return_is_the_sum_of_rewards(env, seed):
    actions = uniform_actions(jr.key(seed), env)
    _, rewards, episode_return, _ = jit_evaluate(env, env.initial_state(), actions)
    # The two sums of 20 float32 terms may be ordered differently; each is off by
    # at most 20 ulp-sized errors, about 1.2e-6 of the sum of |r_k|.
    total = float(jnp.sum(jnp.abs(rewards)))
    assert abs(float(episode_return) - float(jnp.sum(rewards))) <= 1e-5 * total


@given(seed=st.integers(0, 2**32 - 1), spread=st.floats(1.5, 10.0))
def test_actions_outside_the_box_act_as_clipped(env, seed, spread):
    s1 = env.initial_state()
    # The first action is set outside the box, so that there always is one.
    actions = uniform_actions(jr.key(seed), env, -spread, spread).at[0, 0].set(spread)
    clipped = jnp.clip(actions, -1.0, 1.0)
    states, rewards, episode_return, grad = jit_evaluate(env, s1, actions)
    expected = jit_evaluate(env, s1, clipped)
    # The clip is the first operation applied to an action, and both calls run the
    # same compiled function on identical inputs after it: exact equality.
    np.testing.assert_array_equal(states, expected[0])
    np.testing.assert_array_equal(rewards, expected[1])
    np.testing.assert_array_equal(episode_return, expected[2])
    # Outside the box the return is flat in that action, so its gradient is zero.
    outside = jnp.abs(actions) > 1.0
    assert jnp.any(outside)
    np.testing.assert_array_equal(grad[outside], 0.0)


SOLVERS = [diffrax.Heun(), diffrax.Tsit5()]


def _solver_id(solver) -> str:
    return type(solver).__name__


@pytest.mark.parametrize("solver", SOLVERS, ids=_solver_id)
def test_other_explicit_solvers(task_name, solver):
    env = diffenvs.make(task_name, horizon=HORIZON, solver=solver)
    assert env.solver is solver
    actions = uniform_actions(jr.key(11), env)
    states, rewards, episode_return, _ = jit_evaluate(env, env.initial_state(), actions)
    assert states.shape == (env.horizon, env.state_dim)
    assert jnp.all(jnp.isfinite(states))
    assert jnp.all(jnp.isfinite(rewards))
    assert jnp.isfinite(episode_return)


@pytest.mark.parametrize("solver", SOLVERS, ids=_solver_id)
def test_other_explicit_solvers_gradients(task_name, solver):
    env = diffenvs.make(task_name, horizon=HORIZON, solver=solver)
    actions = uniform_actions(jr.key(11), env)
    *_, grad = jit_evaluate(env, env.initial_state(), actions)
    assert jnp.all(jnp.isfinite(grad))


def test_multistage_stages_are_evaluated_in_the_box(x64):
    """bacteria with Tsit5, driven onto its absorbing bound x = 0 with u = 1.9: each
    step's stages fall far below 0, where e^{-x} overflows. Evaluated at the nearest
    point of the box instead, the state stays at 0 and the gradient is finite and
    agrees with central differences."""
    env = make_float64("bacteria", 20, solver=diffrax.Tsit5())
    actions = jnp.full((env.horizon, 1), 0.9)
    states, _, episode_return, grad = jit_evaluate(env, env.initial_state(), actions)
    assert jnp.all(states[-5:] == 0.0)
    assert jnp.isfinite(episode_return)
    assert jnp.all(jnp.isfinite(grad))
    expected = central_differences(env.episode_return, actions, 1e-6)
    np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-7)


def test_multistage_box_leaves_interior_steps_alone():
    """Where no stage leaves the box, evaluating the field in the box changes
    nothing: hiv with Heun equals the same steps with the bounds removed."""

    class Unbounded(type(diffenvs.make("hiv", horizon=100))):
        x_lo = None
        x_hi = None

    env = diffenvs.make("hiv", horizon=100, solver=diffrax.Heun())
    free = Unbounded(horizon=100, solver=diffrax.Heun())
    actions = uniform_actions(jr.key(3), env)
    states = eqx.filter_jit(env.predict)(env.initial_state(), actions)
    # The reference trajectory stays strictly inside the box, so the comparison is
    # about the stage evaluations alone.
    assert jnp.all((states > 0.0) & (states < jnp.array([1600.0, 100.0, 100.0])))
    np.testing.assert_array_equal(
        states, eqx.filter_jit(free.predict)(env.initial_state(), actions)
    )


def test_user_task_through_make():
    diffenvs.register(USER_TASK, LinearSystem, overwrite=True)
    assert USER_TASK in diffenvs.names()
    horizon = 8
    env = diffenvs.make(USER_TASK, horizon=horizon, damping=0.2)
    assert type(env) is LinearSystem
    assert float(env.damping) == pytest.approx(0.2)
    # The zero action is the midpoint of the control box [-2, 2], u = 0, so Euler
    # is the linear map x_{k+1} = (I + dt A) x_k and x_k = (I + dt A)^k x_0.
    actions = jnp.zeros((horizon, 1))
    states = env.predict(env.initial_state(), actions)
    euler = np.eye(2) + env.dt * np.asarray(env.matrix())
    expected = [
        np.linalg.matrix_power(euler, k + 1) @ np.array(LinearSystem.x0)
        for k in range(horizon)
    ]
    # float32 arithmetic over 8 steps of a contraction: a few ulp of O(1) values.
    np.testing.assert_allclose(states, np.stack(expected), rtol=0, atol=1e-6)
