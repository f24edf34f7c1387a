"""Remark 1 (Appendix B) of Ma et al. (2024): "Training an AWM instantiated with an
RNN to predict states using teacher forcing is equivalent to training its
recurrent cell with the loss function from Equation 6",

    ℓ^f̂(τ; ψ) = Σ_{t=1}^{H-1} ‖s^τ_{t+1} - f̂_ψ(s^τ_t, a^τ_t)‖².

The RNN meant is the one of Proposition 1: its hidden state is the environment's
state and its cell is a one-step model f̂_ψ (App. B: teacher forcing sets "the
environment/RNN states" to the ground truth). Teacher forcing replaces the carry
at every step by the true state, which makes every step's prediction
f̂_ψ(s^τ_t, a^τ_t): the two losses are the same function of ψ, so they have the
same value and the same gradient at every ψ, and gradient-based training follows
the same path. The equivalence is with teacher forcing only: the free-running
loss of the same AWM, which the package trains AWMs with, is a different function
of ψ whenever H > 2.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import make_float64
from hypothesis import given, strategies as st
from jax.flatten_util import ravel_pytree
from jaxtyping import Array
from theory.common import x64_settings

HORIZON = 10


class DifferenceCell(eqx.Module):
    """A one-step model f̂_ψ(s, a) = s + MLP_ψ(s, a), as the package's Markov
    model. Single example."""

    mlp: eqx.nn.MLP

    def __init__(self, state: int, action: int, key):
        self.mlp = eqx.nn.MLP(state + action, state, 16, 2, jax.nn.tanh, key=key)

    def __call__(self, state: Array, action: Array) -> Array:
        return state + self.mlp(jnp.concatenate([state, action]))


def unroll(cell, s1, actions, teacher: Array | None = None):
    """The RNN AWM g(s1, a_{1:t}) with recurrent cell `cell` and hidden state
    ŝ_t. With `teacher` (the true states s_1 ... s_H, shape `(horizon, state)`)
    the carry is replaced by the true state before every step: teacher forcing.

    Returns:
        The predictions ŝ_2 ... ŝ_{H+1}, shape `(horizon, state)`.
    """

    def body(carry, inputs):
        action, true_state = inputs
        hidden = carry if teacher is None else true_state
        prediction = cell(hidden, action)
        return prediction, prediction

    forced = jnp.zeros((actions.shape[0], s1.shape[0])) if teacher is None else teacher
    return jax.lax.scan(body, s1, (actions, forced))[1]


def teacher_forced_loss(cell, states, actions) -> Array:
    """Σ_t ‖s_{t+1} - ŝ_{t+1}‖² of the teacher-forced RNN on τ = (s_1, a_1, ...,
    s_H): `states` has the H true states, `actions` the H - 1 actions between."""
    predictions = unroll(cell, states[0], actions, teacher=states[:-1])
    return jnp.sum((states[1:] - predictions) ** 2)


def one_step_loss(cell, states, actions) -> Array:
    """Eq. 6: the one-step loss of the cell on the same transitions."""
    predictions = jax.vmap(cell)(states[:-1], actions)
    return jnp.sum((states[1:] - predictions) ** 2)


def free_running_loss(cell, states, actions) -> Array:
    """The same RNN unrolled on its own predictions from s1 (AWM training)."""
    predictions = unroll(cell, states[0], actions)
    return jnp.sum((states[1:] - predictions) ** 2)


@eqx.filter_jit
def _losses_and_grads(cell, states, actions):
    return [
        eqx.filter_value_and_grad(loss)(cell, states, actions)
        for loss in (teacher_forced_loss, one_step_loss, free_running_loss)
    ]


@eqx.filter_jit
def _train(cell, states, actions, loss_fn, steps: int):
    """`steps` Adam steps on one loss (learning rate 1e-2)."""
    optimiser = optax.adam(1e-2)
    params, static = eqx.partition(cell, eqx.is_inexact_array)

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(lambda p: loss_fn(eqx.combine(p, static), states, actions))(
            params
        )
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimiser.init(params)), None, steps)
    return eqx.combine(params, static)


def _trajectory(name: str, seed: int):
    """A true trajectory τ of a task under uniform random actions, its states
    divided by their initial magnitude (models work on normalised states)."""
    return _simulate(make_float64(name, HORIZON - 1), jax.random.key(seed))


@eqx.filter_jit
def _simulate(env, key):
    actions = jax.random.uniform(
        key, (env.horizon, env.action_dim), jnp.float64, -1.0, 1.0
    )
    s1 = env.initial_state()
    states = jnp.concatenate([s1[None], env.predict(s1, actions)])
    return states / (1.0 + jnp.max(jnp.abs(s1))), actions


def _flat(tree) -> np.ndarray:
    """The floating-point leaves of a pytree (parameters or gradients), flat."""
    return np.asarray(ravel_pytree(eqx.filter(tree, eqx.is_inexact_array))[0])


@x64_settings
@given(
    name=st.sampled_from(["hiv", "double_pendulum"]),
    data_seed=st.integers(0, 2**31 - 1),
    model_seed=st.integers(0, 2**31 - 1),
)
def test_teacher_forcing_is_one_step_training(x64, name, data_seed, model_seed):
    states, actions = _trajectory(name, data_seed)
    cell = DifferenceCell(states.shape[1], actions.shape[1], jax.random.key(model_seed))
    (tf, g_tf), (one, g_one), (free, g_free) = _losses_and_grads(cell, states, actions)
    g_tf, g_one, g_free = _flat(g_tf), _flat(g_one), _flat(g_free)
    # The same H - 1 cell evaluations on the same inputs, computed in a scan on one
    # side and a vmap on the other: XLA may fuse them differently, so allow a few
    # ulp per operation, 1e-12 of each quantity's scale.
    assert abs(float(tf - one)) <= 1e-12 * float(one)
    np.testing.assert_allclose(g_tf, g_one, rtol=0, atol=1e-12 * np.max(np.abs(g_one)))
    # Not vacuous: free running differs, in value and gradient. After the first
    # step its inputs are predictions, which an untrained cell gets wrong by
    # O(1) of the state scale (normalised to about 1).
    assert abs(float(free - one)) > 1e-6 * float(one)
    assert np.max(np.abs(g_free - g_one)) > 1e-6 * np.max(np.abs(g_one))


def test_training_paths_coincide(x64):
    """Gradient steps on either loss give the same parameters: training by teacher
    forcing is training the cell on one-step targets."""
    states, actions = _trajectory("hiv", 0)
    cell = DifferenceCell(states.shape[1], actions.shape[1], jax.random.key(1))
    trained = [
        _flat(_train(cell, states, actions, loss, 50))
        for loss in (teacher_forced_loss, one_step_loss, free_running_loss)
    ]
    start = _flat(cell)
    # Adam divides by the root mean square of the gradients, so differences of
    # 1e-12 relative in the gradients stay of that order in every step; after 50
    # steps of size 1e-2 the parameters agree to far better than 1e-9.
    np.testing.assert_allclose(trained[0], trained[1], rtol=0, atol=1e-9)
    # Training moved the parameters, and free running went elsewhere.
    assert np.max(np.abs(trained[1] - start)) > 0.1
    assert np.max(np.abs(trained[2] - trained[1])) > 1e-3


def test_horizon_two_cannot_tell_them_apart(x64):
    """With one transition (H = 2) the free-running RNN also starts from the true
    s_1: the three losses coincide. Beyond it, only teacher forcing matches."""
    states, actions = _trajectory("hiv", 3)
    cell = DifferenceCell(states.shape[1], actions.shape[1], jax.random.key(2))
    first = [
        float(loss(cell, states[:2], actions[:1]))
        for loss in (teacher_forced_loss, one_step_loss, free_running_loss)
    ]
    # The same single cell evaluation: identical up to one rounding.
    np.testing.assert_allclose(first, first[1], rtol=1e-14)
