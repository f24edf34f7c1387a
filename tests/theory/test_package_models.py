"""Thm. 1 and Remark 1 of Ma et al. (2024) on the package's own models that read
predicted states: `markov`, `hwm-lstm` and `hwm-transformer`, at the papers'
sizes (arXiv App. C), through their public interface only.

Every such model has a teacher-forced form, `teacher_forced(s1, actions,
states)`, whose row t is h(s1, states[:t], actions[:t+1]): the model's one-step
function evaluated on the states it is given. `predict` unrolls the same h on its
own predictions. So, with ŝ = `predict(s1, a)`:

* the local Jacobians of Thm. 1, ∂h_t/∂ŝ_i and ∂h_t/∂a_k, are those of
  `teacher_forced` at states = ŝ, and the Jacobian of `predict` solves the
  recursion dŝ_t/da_k = ∂h_t/∂a_k + Σ_{i<t} ∂h_t/∂ŝ_i dŝ_i/da_k exactly;
* the norms then satisfy the proof's inequality (*) with the measured local
  norms, and its closed form L_a (1 + L_s)^{t-k-1} with L_a, L_s the largest
  local norms along the trajectory (L_a L_s^{t-k-1} for the Markov model, whose
  h reads the newest state only), and the summed form L_a Σ_d L_Σ^d;
* teacher forcing trains h as a one-step predictor on true states (Remark 1 and
  eq. 6 for the Markov model, its history analogue for an HWM): the loss that
  `worldmodels.loss` and `worldmodels.fit` use has the value and gradient of the
  sum of per-transition losses, each computed from the true inputs of its
  transition alone, and differs from the free-running loss.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import make_float64
from hypothesis import given, strategies as st
from jax.flatten_util import ravel_pytree
from theory.common import assert_at_most, block_norms, lag_matrix, x64_settings
from theory.ratios import record

import worldmodels

TASK = "invasive_plant"  # 5 state and 5 action dimensions: no scalar shortcuts
HORIZON = 10
STATE_READERS = ["markov", "hwm-lstm", "hwm-transformer"]


def _model(name, env, seed, scale):
    """The configuration `name` at the papers' sizes, initialised from `seed`,
    every weight multiplied by `scale` (larger weights, larger local Jacobians),
    with a normaliser that is not the identity."""
    model = jax.tree.map(
        lambda x: x * scale if eqx.is_inexact_array(x) else x,
        worldmodels.make(name, env, key=jr.key(seed)),
    )
    normaliser = worldmodels.Normaliser(jnp.full(5, 1.0), jnp.full(5, 0.5))
    return worldmodels.with_normaliser(model, normaliser)


@eqx.filter_jit
def _analyse(model, s1, actions):
    """ŝ = predict(s1, a), teacher_forced at ŝ, the Jacobian of `predict` with
    respect to the actions, `(H, n, H, m)`, and the local Jacobians of
    `teacher_forced` at ŝ with respect to the states, `(H, n, H, n)`, and the
    actions, `(H, n, H, m)`. Reverse mode: the transformer's attention has no
    forward-mode rule."""
    states = model.predict(s1, actions)
    forced = model.teacher_forced(s1, actions, states)
    total = jax.jacrev(model.predict, argnums=1)(s1, actions)
    d_states, d_actions = jax.jacrev(model.teacher_forced, argnums=(2, 1))(
        s1, actions, states
    )
    return states, forced, total, d_states, d_actions


def _chain_rule(d_states, d_actions):
    """dŝ_t/da = ∂h_t/∂a + Σ_{i<t} ∂h_t/∂ŝ_i dŝ_i/da, from the local Jacobians."""
    total = np.zeros_like(d_actions)
    for t in range(d_actions.shape[0]):
        total[t] = d_actions[t] + np.einsum(
            "nis,isjm->njm", d_states[t, :, :t], total[:t]
        )
    return total


def _recursion(state_norms, action_norms):
    """The proof's bound (*) with the measured local norms: B[t, k] =
    ‖∂h_t/∂a_k‖ + Σ_{i<t} ‖∂h_t/∂ŝ_i‖ B[i, k]."""
    bound = np.zeros_like(action_norms)
    for t in range(action_norms.shape[0]):
        bound[t] = action_norms[t] + state_norms[t, :t] @ bound[:t]
    return bound


@pytest.mark.parametrize("name", STATE_READERS)
@x64_settings
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.5, 2.0))
def test_theorem_1_on_the_package_models(x64, name, seed, scale):
    env = make_float64(TASK, HORIZON)
    model = _model(name, env, seed, scale)
    rng = np.random.default_rng(seed)
    s1 = jnp.asarray(rng.uniform(0.0, 3.0, 5))
    # Inside (-1, 1): the models clip actions, and the clip's derivative is 1
    # only in the interior.
    actions = jnp.asarray(rng.uniform(-0.9, 0.9, (HORIZON, 5)))
    states, forced, total, d_states, d_actions = (
        np.asarray(x) for x in _analyse(model, s1, actions)
    )
    # `teacher_forced` at the model's own predictions is `predict`: the same h,
    # computed in parallel rather than step by step (float64 rounding).
    np.testing.assert_allclose(
        forced, states, rtol=0, atol=1e-12 * np.abs(states).max()
    )
    state_norms, action_norms = block_norms(d_states), block_norms(d_actions)
    # Causality, exactly: row t reads the states before it and actions up to t.
    np.testing.assert_array_equal(np.triu(state_norms), 0.0)
    np.testing.assert_array_equal(np.triu(action_norms, 1), 0.0)
    markov = name == "markov"
    if markov:
        # h reads the newest state and action only.
        np.testing.assert_array_equal(np.tril(state_norms, -2), 0.0)
        np.testing.assert_array_equal(np.tril(action_norms, -1), 0.0)
    # The chain rule through the local Jacobians gives the Jacobian of `predict`
    # (sums of at most H products, float64: 1e-10 of the largest entry).
    np.testing.assert_allclose(
        _chain_rule(d_states, d_actions),
        total,
        rtol=0,
        atol=1e-10 * np.abs(total).max(),
    )
    norms = block_norms(total)
    recursion = _recursion(state_norms, action_norms)
    below = np.tril_indices(HORIZON, -1)  # lags ≥ 1; at lag 0 (*) is exact
    record("thm1_package_recursion", norms[below], recursion[below])
    assert_at_most(norms, recursion, err_msg=f"{name}: recursion")
    l_s, l_a = float(state_norms.max()), float(action_norms.max())
    lags = lag_matrix(HORIZON)
    base = l_s if markov else 1.0 + l_s
    closed_form = np.tril(l_a * base**lags)
    record("thm1_package_closed_form", norms[below], closed_form[below])
    assert_at_most(recursion, closed_form, err_msg=f"{name}: closed form")
    l_sum = float(state_norms.sum(axis=1).max())
    summed = np.tril(l_a * np.cumsum(l_sum ** np.arange(HORIZON))[lags])
    record("thm1_package_summed", norms[below], summed[below])
    assert_at_most(recursion, summed, err_msg=f"{name}: summed sensitivity")


def _episodes(env, episodes: int, seed: int) -> worldmodels.Episodes:
    actions = jr.uniform(
        jr.key(seed), (episodes, env.horizon, env.action_dim), jnp.float64, -0.9, 0.9
    )
    return worldmodels.Episodes.from_env(env, actions)


def _one_step_mask(markov: bool, t: int):
    """Which state rows and action rows the prediction of row t may read: the
    newest state (row t - 1, or s1) and action for a Markov model, every earlier
    state and every action up to t for an HWM."""
    rows = np.arange(HORIZON)
    if markov:
        return rows == t - 1, rows == t
    return rows < t, rows <= t


def _one_step_rows(model, s1, actions, states, markov: bool):
    """Row t of the predictions from a separate call given only the true inputs
    row t may read (`_one_step_mask`; the rest zeroed), for every t."""

    def row(t, state_mask, action_mask):
        kept_states = jnp.where(state_mask[:, None], states, 0.0)
        kept_actions = jnp.where(action_mask[:, None], actions, 0.0)
        return model.teacher_forced(s1, kept_actions, kept_states)[t]

    masks = [_one_step_mask(markov, t) for t in range(HORIZON)]
    state_masks = jnp.asarray(np.stack([state for state, _ in masks]))
    action_masks = jnp.asarray(np.stack([action for _, action in masks]))
    return jax.vmap(row)(jnp.arange(HORIZON), state_masks, action_masks)


def _losses(model, s1, actions, states, scale, markov: bool):
    """Three losses of one episode, each the mean over rows and dimensions of the
    squared error divided by `scale`:

    * teacher forced: `worldmodels.loss`, what `fit` minimises;
    * one step: each row from its own call given only its true inputs
      (`_one_step_rows`): eq. 6 for the Markov model, its history analogue for
      an HWM;
    * free running: the model's own `predict`.
    """
    forced = worldmodels.loss(model, s1, actions, states, scale)
    rows = _one_step_rows(model, s1, actions, states, markov)
    one_step = jnp.mean(jnp.square((rows - states) / scale))
    free = jnp.mean(jnp.square((model.predict(s1, actions) - states) / scale))
    return forced, one_step, free


@eqx.filter_jit
def _losses_and_grads(model, episodes, scale):
    """The three losses of a Markov model, averaged over the episodes, and their
    gradients with respect to the trainable parameters."""
    params, static = eqx.partition(model, worldmodels.parameters(model))

    def mean_losses(params):
        model = eqx.combine(params, static)
        per_episode = jax.vmap(
            lambda s1, a, s: jnp.stack(_losses(model, s1, a, s, scale, True))
        )(episodes.s1, episodes.actions, episodes.states)
        return jnp.mean(per_episode, axis=0)

    values = mean_losses(params)
    jacobian = jax.jacrev(mean_losses)(params)
    return values, [jax.tree.map(lambda g, i=i: g[i], jacobian) for i in range(3)]


def _flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(eqx.filter(tree, eqx.is_inexact_array))[0])


def _fitted_normaliser(episodes):
    states = jnp.concatenate([episodes.s1[:, None], episodes.states], axis=1)
    return worldmodels.Normaliser.from_states(states)


def test_teacher_forcing_is_one_step_training_for_the_markov_model(x64):
    """Remark 1 on the package's Markov model (an RNN AWM whose hidden state is
    the state and whose cell is ŝ + MLP(ŝ, a, t)): the teacher-forced loss that
    `fit` minimises and eq. 6, each transition predicted by a separate call from
    its true state and action alone, are the same function of the parameters
    (value and gradient to 1e-12); the free-running loss is another."""
    env = make_float64(TASK, HORIZON)
    episodes = _episodes(env, 2, 0)
    normaliser = _fitted_normaliser(episodes)
    model = worldmodels.with_normaliser(
        worldmodels.make("markov", env, key=jr.key(1)), normaliser
    )
    values, grads = _losses_and_grads(model, episodes, normaliser.scale)
    forced, one_step, free = (float(v) for v in values)
    g_forced, g_one, g_free = (_flat(g) for g in grads)
    record("remark1", np.linalg.norm(g_forced), np.linalg.norm(g_one))
    # The same cell evaluations on the same inputs, in one parallel call on one
    # side and H masked calls on the other: rounding only (1e-12 of the scale).
    assert abs(forced - one_step) <= 1e-12 * one_step
    np.testing.assert_allclose(
        g_forced, g_one, rtol=0, atol=1e-12 * np.abs(g_one).max()
    )
    # Not vacuous: after the first step free running reads its own predictions,
    # which an untrained model gets wrong by O(1) of the normalised scale.
    assert abs(free - one_step) > 1e-3 * one_step
    assert np.abs(g_free - g_one).max() > 1e-3 * np.abs(g_one).max()


@eqx.filter_jit
def _hwm_predictions(model, episodes):
    """For each episode: teacher-forced rows, the same rows each from a separate
    call given only the true past, and the free-running predictions."""

    def one(s1, actions, states):
        forced = model.teacher_forced(s1, actions, states)
        rows = _one_step_rows(model, s1, actions, states, False)
        return forced, rows, model.predict(s1, actions)

    return jax.vmap(one)(episodes.s1, episodes.actions, episodes.states)


@pytest.mark.parametrize("name", ["hwm-transformer"])
def test_hwm_teacher_forcing_predicts_from_the_true_past(x64, name):
    """The history analogue of Remark 1 for the package's HWMs: teacher-forced
    row t is h(s_{1:t}, a_{1:t}) on the true states, the same value as a separate
    call given the true past alone (future states and actions zeroed), so the
    training loss is Σ_t ‖s_{t+1} - h(s_{1:t}, a_{1:t})‖², one-step training of
    h; `test_theorem_1_on_the_package_models` shows that h is the function
    `predict` unrolls and that row t reads nothing after t (exact zeros of its
    Jacobian). Free running agrees at the first row only, where both start from
    the true s1."""
    env = make_float64(TASK, HORIZON)
    episodes = _episodes(env, 2, 0)
    model = worldmodels.with_normaliser(
        worldmodels.make(name, env, key=jr.key(1)), _fitted_normaliser(episodes)
    )
    forced, rows, free = (np.asarray(x) for x in _hwm_predictions(model, episodes))
    scale = np.abs(forced).max()
    # The same computation on inputs that differ only where causality hides
    # them: float64 rounding (1e-12 of the scale).
    np.testing.assert_allclose(rows, forced, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(free[:, 0], forced[:, 0], rtol=0, atol=1e-12 * scale)
    # Later rows: an untrained model's own predictions are not the true states.
    assert np.abs(free[:, 1:] - forced[:, 1:]).max() > 1e-3 * scale


@eqx.filter_jit
def _adam_on_one_step_loss(model, episodes, scale, steps: int):
    """`steps` Adam steps (1e-2) on the one-step loss of the first episode."""
    optimiser = optax.adam(1e-2)
    params, static = eqx.partition(model, worldmodels.parameters(model))
    first = jax.tree.map(lambda x: x[0], episodes)

    def loss(params):
        model = eqx.combine(params, static)
        return _losses(model, first.s1, first.actions, first.states, scale, True)[1]

    def step(carry, _):
        params, opt_state = carry
        updates, opt_state = optimiser.update(jax.grad(loss)(params), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimiser.init(params)), None, steps)
    return eqx.combine(params, static)


def test_fit_trains_the_markov_cell_on_one_step_targets(x64):
    """`worldmodels.fit` on one episode (every minibatch is that episode) follows
    the same path as Adam on eq. 6 built from separate one-step predictions."""
    env = make_float64(TASK, HORIZON)
    episodes = _episodes(env, 1, 2)
    normaliser = _fitted_normaliser(episodes)
    model = worldmodels.with_normaliser(
        worldmodels.make("markov", env, key=jr.key(3)), normaliser
    )
    steps = 30
    fitted, _ = worldmodels.fit(
        model,
        episodes,
        key=jr.key(4),
        steps=steps,
        batch_size=1,
        optimiser=optax.adam(1e-2),
        normalise=False,
    )
    manual = _adam_on_one_step_loss(model, episodes, normaliser.scale, steps)
    start, fitted, manual = (
        _flat(eqx.filter(m, worldmodels.parameters(m))) for m in (model, fitted, manual)
    )
    # Adam normalises each step by the gradient's running RMS, so gradients that
    # agree to 1e-12 relative give steps that agree to about that; over 30 steps
    # of size 1e-2 the parameters agree to far better than 1e-9.
    np.testing.assert_allclose(fitted, manual, rtol=0, atol=1e-9)
    assert np.abs(fitted - start).max() > 0.1  # training moved them
