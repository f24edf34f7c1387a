"""Numerical truths of the individual tasks, as fixed by the specification: closed
forms, conservation laws, orders of convergence and known optima."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import jit_evaluate, make_float64, uniform_actions
from hypothesis import HealthCheck, given, settings, strategies as st

import diffenvs

# The `x64` fixture is a context that must hold for every example of a property,
# which is what a function-scoped fixture shared by the examples gives.
x64_settings = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def _first_action(horizon: int, a0) -> jax.Array:
    """An action sequence whose first action is `a0` and the rest zero (ignored by
    the tasks whose later actions play no part)."""
    return jnp.zeros((horizon, 1)).at[0, 0].set(a0)


# ---- double_pendulum -------------------------------------------------------------


@eqx.filter_jit
def _pendulum_sensitivities(env, first_actions):
    """d x_k / d a_0 for k = 1 ... H, one row per step, for each first action."""

    def one(a0):
        actions = _first_action(env.horizon, a0)
        tangent = _first_action(env.horizon, 1.0)
        predict = lambda a: env.predict(env.initial_state(), a)  # noqa: E731
        return jax.jvp(predict, (actions,), (tangent,))[1]

    return jax.vmap(one)(first_actions)


def _r_squared(x, y):
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    return 1.0 - np.sum(residual**2) / np.sum((y - y.mean()) ** 2), slope


def test_double_pendulum_sensitivity_grows_exponentially(x64):
    # The dynamics do not depend on H (dt is fixed and only the reward knows the
    # goal), so x_H of the task with horizon H is row H of one 400-step run, and a
    # single forward-mode pass gives d x_H / d a_0 for every H up to 400.
    horizon = 400
    env = make_float64("double_pendulum", horizon)
    first_actions = jnp.array([-0.4, 0.3, 0.6])
    sensitivities = _pendulum_sensitivities(env, first_actions)
    norms = np.linalg.norm(np.asarray(sensitivities), axis=-1)

    # The same quantity measured on the task built with the short horizon.
    short = make_float64("double_pendulum", 25)
    np.testing.assert_allclose(
        _pendulum_sensitivities(short, first_actions)[:, -1],
        sensitivities[:, 24],
        rtol=1e-12,  # identical float64 operations; only the goal differs
    )

    horizons = np.arange(25, horizon + 1)
    for a0, norm in zip(first_actions, norms, strict=True):
        log_norm = np.log(norm[horizons - 1])
        r2_exponential, rate = _r_squared(horizons * env.dt, log_norm)
        r2_power, _ = _r_squared(np.log(horizons), log_norm)
        message = f"a_0={float(a0)}: rate={rate:.3f}/s, R2={r2_exponential:.3f}"
        # Measured (float64, deterministic): rates 0.76 to 1.67 per second of
        # simulated time, R2 0.86 to 0.94, growth 300 to 39000 from H = 25 to 400.
        # The thresholds sit below these with room, and far above what bounded or
        # linearly growing sensitivities (a regular pendulum) would give.
        assert rate > 0.5, message
        assert r2_exponential > 0.8, message
        # The norm oscillates around its trend; a power law H^p fits the trend worse
        # than an exponential (R2 0.71 to 0.76 measured).
        assert r2_exponential > r2_power, message
        assert norm[horizon - 1] / norm[24] > 100, message


def test_double_pendulum_energy_is_conserved_by_tsit5(x64):
    env = make_float64("double_pendulum", 250, solver=diffrax.Tsit5())
    energies = _pendulum_energies(env, jnp.array([-0.4, 0.3, 0.6]))
    drift = jnp.max(jnp.abs(energies - energies[:, :1]))
    # Tsit5's local error is O(dt^5): at dt = 0.02 the energy moves by at most
    # 1.7e-4 J over 250 steps (measured); 1e-3 J is 3e-5 of the energy scale
    # (m1 + m2) g l1 + m2 g l2 = 29.4 J.
    assert float(drift) < 1e-3


def test_double_pendulum_euler_gains_energy(x64):
    # Explicit Euler on an oscillator multiplies the energy by about (1 + w^2 dt^2)
    # every step: it only ever gains. Measured gains are 17 to 26 J over 250 steps,
    # against the scale 29.4 J; the threshold 5 J is far above Tsit5's 1e-3 J.
    env = make_float64("double_pendulum", 250)
    energies = _pendulum_energies(env, jnp.array([-0.4, 0.3, 0.6]))
    gains = energies[:, -1] - energies[:, 0]
    assert jnp.all(gains > 5.0), gains


@eqx.filter_jit
def _pendulum_energies(env, first_actions):
    """The energy of x_1 ... x_H (x_1 is the pendulum placed at rest), for each
    first action."""

    def one(a0):
        states = env.predict(env.initial_state(), _first_action(env.horizon, a0))
        return jax.vmap(env.energy)(states)

    return jax.vmap(one)(first_actions)


def test_double_pendulum_target_action_reaches_the_goal(x64):
    env = make_float64("double_pendulum", 30)
    episode_return = env.episode_return(env.reference_actions())
    # The goal is computed from this very action sequence with the same float64
    # operations: the distance is exactly zero.
    assert float(episode_return) == 0.0
    assert float(env.episode_return(_first_action(30, 0.3))) < -1e-3


# ---- one_bounce ------------------------------------------------------------------


@x64_settings
@given(
    a0=st.floats(-1.0, 1.0),
    horizon=st.sampled_from([7, 20]),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_bounce_final_position(x64, a0, horizon, seed):
    env = make_float64("one_bounce", horizon)
    # The later actions are random: the task must ignore them.
    actions = uniform_actions(jr.key(seed), env).at[0, 0].set(a0)
    states, rewards, _, _ = jit_evaluate(env, env.initial_state(), actions)
    v = 1.5 + a0
    expected = 2.0 - v if v > 1.0 else v
    # H additions of dt v in float64: a few ulp of values of order 1.
    assert float(states[-1, 0]) == pytest.approx(expected, abs=1e-12)
    # At v = 1 the block ends exactly at the wall, where rounding decides the
    # bounce; elsewhere the velocity has the sign of the bounce.
    if abs(v - 1.0) > 1e-9:
        assert float(states[-1, 1]) == pytest.approx(-v if v > 1.0 else v, 1e-12)
    assert float(rewards[-1]) == pytest.approx(-((expected - 0.25) ** 2), abs=1e-12)
    np.testing.assert_array_equal(rewards[:-1], 0.0)


def test_one_bounce_optimum_and_kink(x64):
    env = make_float64("one_bounce", 20)
    s1 = env.initial_state()
    # The optimum a* = 0.25 (v = 1.75, x_H = 0.25) returns 0 up to rounding of x_H.
    _, _, optimum, _ = jit_evaluate(env, s1, _first_action(20, 0.25))
    assert float(optimum) == pytest.approx(0.0, abs=1e-24)
    # The kink at a_0 = -0.5: the slope of -(x_H - 0.25)^2 jumps from
    # -2 (v - 0.25) = -1.5 on the left (no bounce, x_H = v) to +1.5 on the right
    # (x_H = 2 - v); 1e-3 away from the kink each is off by 2e-3.
    *_, left = jit_evaluate(env, s1, _first_action(20, -0.5 - 1e-3))
    *_, right = jit_evaluate(env, s1, _first_action(20, -0.5 + 1e-3))
    assert float(left[0, 0]) == pytest.approx(-1.5 + 2e-3, rel=1e-9)
    assert float(right[0, 0]) == pytest.approx(1.5 - 2e-3, rel=1e-9)


# ---- credit_assignment -----------------------------------------------------------


@pytest.mark.parametrize("horizon", [1, 2, 10, 64])
def test_copy_task_optimum_returns_exactly_ten(horizon):
    env = diffenvs.make("credit_assignment", horizon=horizon)
    optimum = env.reference_actions()
    np.testing.assert_array_equal(optimum, _first_action(horizon, 0.5))
    # Every penalty is the square of an exact zero: the return is exactly 10,
    # even in float32.
    assert float(env.episode_return(optimum)) == 10.0
    # The last action carries no penalty.
    free_last = optimum.at[-1, 0].set(0.9) if horizon > 1 else optimum
    assert float(env.episode_return(free_last)) == 10.0


@x64_settings
@given(actions=st.lists(st.floats(-1.0, 1.0), min_size=10, max_size=10))
def test_copy_task_return_closed_form(x64, actions):
    horizon = 10
    env = make_float64("credit_assignment", horizon)
    a = np.asarray(actions)
    _, _, episode_return, _ = jit_evaluate(
        env, env.initial_state(), jnp.asarray(a)[:, None]
    )
    # -20 (a_0 - 0.5)^2 + 10 at the end, and -a_k^2 / H for 0 < k < H - 1.
    expected = 10.0 - 20.0 * (a[0] - 0.5) ** 2 - np.sum(a[1:-1] ** 2) / horizon
    assert float(episode_return) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert float(episode_return) <= 10.0


# ---- convergence of the explicit solvers on harvest -----------------------------


@eqx.filter_jit
def _final_state(env, actions):
    return env.predict(env.initial_state(), actions)[-1]


def _harvest_error(solver, horizon: int) -> float:
    # A constant harvest u = 0.3 (action -0.4) makes x' = -(m + u) x linear, with
    # x(T) = x0 exp(-(m + u) T); mortality m = 0.3 is passed as an option.
    env = make_float64("harvest", horizon, solver=solver, mortality=0.3)
    actions = jnp.full((horizon, 1), -0.4)
    exact = 0.4 * np.exp(-(0.3 + 0.3) * 10.0)
    return abs(float(_final_state(env, actions)[0]) - exact)


@pytest.mark.parametrize(
    "solver, order, tolerance",
    [
        # The error is C dt^p (1 + O(dt)): with (m + u) T = 6 the ratio from
        # H = 400 to 800 is 2 (1 - 6.3e-3) = 1.987 for Euler (from its closed form
        # x0 (1 - 6 / H)^H) and 4.023 for Heun (measured). The tolerances are a
        # little over twice these offsets, and far from the neighbouring orders.
        (diffrax.Euler(), 1, 0.03),
        (diffrax.Heun(), 2, 0.05),
    ],
    ids=["Euler", "Heun"],
)
def test_harvest_error_order(x64, solver, order, tolerance):
    ratio = _harvest_error(solver, 400) / _harvest_error(solver, 800)
    assert ratio == pytest.approx(2**order, abs=tolerance)


# ---- timber, bioreactor, invasive_plant, hiv -------------------------------------


@x64_settings
@given(horizon=st.sampled_from([10, 20]), data=st.data())
def test_timber_bang_bang_return(x64, horizon, data):
    n = data.draw(st.integers(0, horizon), label="n")
    env = make_float64("timber", horizon)
    actions = jnp.where(jnp.arange(horizon) < n, 1.0, -1.0)[:, None]
    _, _, episode_return, _ = jit_evaluate(env, env.initial_state(), actions)
    # Reinvesting (u = 1) multiplies x by 1 + k dt and earns nothing; harvesting
    # (u = 0) keeps x and earns x dt per step.
    dt = 5.0 / horizon
    expected = (horizon - n) * dt * 100.0 * (1.0 + dt) ** n
    assert float(episode_return) == pytest.approx(expected, rel=1e-12)


@given(seed=st.integers(0, 2**32 - 1))
def test_bioreactor_no_feeding_beats_random(seed):
    horizon = 20
    env = diffenvs.make("bioreactor", horizon=horizon)
    s1 = env.initial_state()
    _, _, best, _ = jit_evaluate(env, s1, -jnp.ones((horizon, 1)))
    _, _, random, _ = jit_evaluate(env, s1, uniform_actions(jr.key(seed), env))
    assert float(best) > float(random)


def test_bioreactor_no_feeding_approaches_the_continuous_optimum(x64):
    # With u = 0, x' = -x^2 gives x(t) = x0 / (1 + x0 t) and the return
    # integral of 2 x over [0, 2] = 2 ln 2. Euler's error is O(dt) = O(2e-3) at
    # H = 1000 (2e-4 measured).
    env = make_float64("bioreactor", 1000)
    episode_return = env.episode_return(-jnp.ones((1000, 1)))
    assert float(episode_return) == pytest.approx(2 * np.log(2), abs=1e-3)


@x64_settings
@given(seed=st.integers(0, 2**32 - 1))
def test_invasive_plant_is_the_ten_step_map_at_horizon_ten(x64, seed):
    env = make_float64("invasive_plant", 10)
    actions = np.random.default_rng(seed).uniform(-1.0, 1.0, (10, 5))
    states, rewards, _, _ = jit_evaluate(env, env.initial_state(), jnp.asarray(actions))
    # Myriad's discrete map: x_{k+1} = x_k + k x_k / (eps + x_k) (1 - u_k) - u_k x_k
    # with k = 1, eps = 0.01 (dt = 1), reward -sum u_k^2, and -sum x_H at the end.
    x = np.array([0.5, 1.0, 1.5, 2.0, 10.0])
    expected_states, expected_rewards = [], []
    for a in actions:
        u = (a + 1.0) / 2.0
        expected_rewards.append(-np.sum(u**2))
        x = x + x / (0.01 + x) * (1.0 - u) - u * x
        expected_states.append(x)
    expected_rewards[-1] -= np.sum(x)
    # The same float64 operations in a possibly different order: rounding only.
    np.testing.assert_allclose(states, np.stack(expected_states), rtol=1e-12)
    np.testing.assert_allclose(rewards, expected_rewards, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("horizon", [50, 100])
def test_hiv_returns_are_about_800(horizon):
    env = diffenvs.make("hiv", horizon=horizon)
    constant = jnp.array([-1.0, 0.0, 1.0])[:, None, None] * jnp.ones((horizon, 1))
    random = uniform_actions(jr.key(0), env, batch=(3,))
    batch = jnp.concatenate([constant, random])
    returns = jax.vmap(jit_evaluate, in_axes=(None, None, 0))(
        env, env.initial_state(), batch
    )[2]
    # The return is dominated by A T integrated over 20 time units with T near
    # 800; measured 779 to 813 for full, half, no therapy and random therapy.
    # "About 800" is taken as within 5%.
    np.testing.assert_array_less(np.abs(np.asarray(returns) - 800.0), 40.0)


# ---- observations ----------------------------------------------------------------


@given(
    name=st.sampled_from(diffenvs.CONTROL_TASKS),
    step=st.integers(0, 16),
    seed=st.integers(0, 2**32 - 1),
)
def test_observe_appends_normalised_time(name, step, seed):
    horizon = 16
    env = diffenvs.make(name, horizon=horizon)
    state = jr.normal(jr.key(seed), (env.state_dim,))
    observation = env.observe(diffenvs.EnvState(state, jnp.asarray(step, jnp.int32)))
    np.testing.assert_array_equal(observation[:-1], state)
    # k / 16 is a dyadic fraction, exact in float32.
    assert float(observation[-1]) == step / horizon


def test_observed_time_is_exact_in_float64(x64):
    """k/H in the observation is computed in the state's precision: in float64 it is
    the correctly rounded quotient, not a float32 one widened."""
    env = diffenvs.make("hiv", horizon=7)
    state = env.reset()
    for k in range(env.horizon):
        observed = env.observe(state)[-1]
        assert observed.dtype == jnp.float64
        assert float(observed) == k / 7
        state, _, _ = env.step(state, jnp.zeros(env.action_dim))
