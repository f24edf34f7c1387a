"""Proposition 1 of Ma et al. (2024): BPO through the simulator equals BPO through
the RNN Actions World Model whose recurrent cell is the simulator's transition f,

    ∇_θ J^{g_{f-RNN}}(θ; H) = ∇_θ J^f(θ; H),

an exact identity, checked here to float64 rounding on several tasks of
`diffenvs` for a closed-loop MLP policy a_k = π_θ(sg[s_k]) and for open-loop
actions. Three computations of the same gradient:

* eq. 1, sequentially: the closed-loop `env.rollout` with a stop-gradient on the
  policy's input, differentiated end to end;
* through the task's `predict`: generate the states, re-evaluate the actions from
  them, one differentiable `predict` call (the package's BPO design);
* through the f-RNN AWM: a scan whose cell is `env.transition`, fed only s1 and
  the actions, with the task's reward on its predicted states.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_float64
from hypothesis import given, strategies as st
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float
from theory.common import TinyPolicy, x64_settings
from theory.ratios import record

import diffenvs

HORIZON = 12
# A task with a vector state (hiv), a discrete map with five controls
# (invasive_plant), a chaotic flow with a terminal reward only (double_pendulum)
# and the copy task, whose reward reads the action (credit_assignment).
TASKS = ["hiv", "invasive_plant", "double_pendulum", "credit_assignment"]


class SimulatorRNN(eqx.Module):
    """g_{f-RNN}: an RNN whose hidden state is the task's state and whose cell is
    the task's transition f(k, s, a). It sees s1 and the actions, nothing else.
    Single example; use `jax.vmap`."""

    env: diffenvs.AbstractEnv

    def cell(self, state: Array, inputs) -> tuple[Array, Array]:
        step, action = inputs
        next_state = self.env.transition(step, state, action)
        return next_state, next_state

    def predict(self, s1: Array, actions: Array) -> Float[Array, "horizon state"]:
        def body(state, inputs):
            return self.cell(state, inputs)

        steps = jnp.arange(actions.shape[0])
        return jax.lax.scan(body, s1, (steps, actions))[1]

    def generate(self, policy) -> Float[Array, "horizon obs"]:
        """The observations a closed-loop policy sees, through the RNN's own
        carry (its incremental interface), without gradient."""

        def body(state, step):
            observation = self.env.observe(diffenvs.EnvState(state, step))
            action = policy(observation)
            return self.cell(state, (step, action))[0], observation

        # int32 step counters, as `env.reset()` makes them.
        steps = jnp.arange(self.env.horizon, dtype=jnp.int32)
        _, observations = jax.lax.scan(body, self.env.initial_state(), steps)
        return jax.lax.stop_gradient(observations)


class ObservationPolicy(eqx.Module):
    """π_θ on the observation (state, k / H), the state divided by a fixed scale
    (tasks' states range up to about 800)."""

    net: TinyPolicy
    scale: Array

    def __call__(self, observation: Array) -> Array:
        state, time = observation[:-1], observation[-1:]
        return self.net(jnp.concatenate([state / self.scale, time]))


def _return_through(predict, env, policy, observations):
    """J(θ) with a_k = π_θ(sg[obs_k]) re-evaluated, states from `predict`."""
    actions = jax.vmap(policy)(jax.lax.stop_gradient(observations))
    s1 = env.initial_state()
    return jnp.sum(env.rewards_from_states(s1, actions, predict(s1, actions)))


@eqx.filter_jit
def _three_gradients(env, policy):
    """J and ∇_θ J through eq. 1, through `predict` and through the f-RNN AWM."""
    awm = SimulatorRNN(env)
    key = jax.random.key(0)  # the tasks are deterministic; rollout wants a key

    def sequential(policy):
        def stopped(observation, key):
            return policy(jax.lax.stop_gradient(observation))

        return jnp.sum(env.rollout(stopped, key).rewards)

    seen = env.rollout(lambda observation, key: policy(observation), key)

    def simulator(policy):
        return _return_through(env.predict, env, policy, seen.observations)

    def rnn(policy):
        return _return_through(awm.predict, env, policy, awm.generate(policy))

    return [eqx.filter_value_and_grad(f)(policy) for f in (sequential, simulator, rnn)]


@eqx.filter_jit
def _open_loop(env, actions):
    """The return and its gradient with respect to open-loop actions, through
    `predict` and through the f-RNN AWM."""
    s1 = env.initial_state()

    def through(predict):
        def objective(actions):
            states = predict(s1, actions)
            return jnp.sum(env.rewards_from_states(s1, actions, states))

        return jax.value_and_grad(objective)(actions)

    return through(env.predict), through(SimulatorRNN(env).predict)


def _flat(grad) -> np.ndarray:
    return np.asarray(ravel_pytree(grad)[0])


@pytest.mark.parametrize("name", TASKS)
@x64_settings
@given(seed=st.integers(0, 2**31 - 1), gain=st.floats(0.2, 3.0))
def test_closed_loop_gradients_are_equal(x64, name, seed, gain):
    env = make_float64(name, HORIZON)
    net = TinyPolicy.init(jax.random.key(seed), env.state_dim + 1, env.action_dim, 8)
    net = eqx.tree_at(lambda n: n.w2, net, gain * net.w2)
    scale = 1.0 + jnp.max(jnp.abs(env.initial_state()))
    policy = ObservationPolicy(net, scale)
    (j_seq, g_seq), (j_sim, g_sim), (j_rnn, g_rnn) = _three_gradients(env, policy)
    g_seq, g_sim, g_rnn = _flat(g_seq), _flat(g_sim), _flat(g_rnn)
    # Not vacuous: the policy moves the return.
    assert np.any(g_sim != 0.0)
    # The same float64 operations on the same numbers, grouped differently (the
    # rollout adds the terminal reward separately, the backward passes run
    # through different scans): rounding only, 1e-16 per operation relative to
    # the largest term (measured: at most 2e-16 of the gradient's scale). 1e-12
    # of that scale is far above rounding and far below any real difference (a
    # missing or extra path changes the gradient by O(1) of its scale).
    scale = float(np.max(np.abs(g_sim)))
    record("prop1", np.linalg.norm([g_rnn, g_seq], axis=1), np.linalg.norm(g_sim))
    np.testing.assert_allclose(g_rnn, g_sim, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(g_seq, g_sim, rtol=0, atol=1e-12 * scale)
    value_scale = 1.0 + abs(float(j_sim))
    assert abs(float(j_rnn - j_sim)) <= 1e-12 * value_scale
    assert abs(float(j_seq - j_sim)) <= 1e-12 * value_scale


@pytest.mark.parametrize("name", TASKS)
@x64_settings
@given(seed=st.integers(0, 2**31 - 1))
def test_open_loop_gradients_are_equal(x64, name, seed):
    env = make_float64(name, HORIZON)
    actions = jax.random.uniform(
        jax.random.key(seed), (HORIZON, env.action_dim), jnp.float64, -0.9, 0.9
    )
    (j_sim, g_sim), (j_rnn, g_rnn) = _open_loop(env, actions)
    assert np.any(np.asarray(g_sim) != 0.0)
    # Identical operations in the same order: the cell is the simulator's step.
    # Allow rounding anyway, as above.
    scale = float(jnp.max(jnp.abs(g_sim)))
    np.testing.assert_allclose(g_rnn, g_sim, rtol=0, atol=1e-12 * scale)
    assert abs(float(j_rnn - j_sim)) <= 1e-12 * (1.0 + abs(float(j_sim)))
