"""Corollary 2.2 for the single self-attention Actions World Model of eq. 5 of Ma
et al. (2024):

    ŝ_t = Attention(a_{t-1} W_qᵀ, a_{1:t-1} W_kᵀ, a_{1:t-1} W_vᵀ)
        = Σ_{i<t} c_i a_i W_vᵀ,  c = softmax(a_{t-1} W_qᵀ W_k a_{1:t-1}ᵀ),

with ‖a_i‖ ≤ α. Printed: ‖∇_θ J‖ = O(H³), from the per-pair bound
‖∂ŝ_t/∂a_k‖ ≤ ‖W_v‖ + α Σ_{i<t} ‖W_v‖ of its proof. That per-pair bound is false
(the proof drops the derivative of the logits, a factor α‖W_q‖‖W_k‖, and the
query's dependence on a_{t-1}); the bound that holds is

    ‖∂ŝ_t/∂a_k‖ ≤ c_k ‖W_v‖(1 + 2α²‖W_q‖‖W_k‖) + 1{k = t-1} 2α²‖W_v‖‖W_q‖‖W_k‖,

whose sum over k is at most C = ‖W_v‖(1 + 4α²‖W_q‖‖W_k‖), independent of t, so
‖∇_θ J‖ ≤ L_r L_π (H - 1) C = O(H): the printed O(H³) holds, loosely.
`docs/theory.md` has the derivation. Indices: see `theory.common`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jaxtyping import Array, Float
from theory.common import (
    TinyPolicy,
    assert_at_most,
    block_norms,
    closed_loop_gradient,
    gradient_norm,
    policy_lipschitz,
    random_matrix,
    spectral_norm,
    x64_settings,
)


class AttentionAWM(eqx.Module):
    """One causal self-attention layer over the actions, exactly eq. 5: no
    scaling of the logits, no projection, no dependence on s1 (the paper's
    footnote 4).

    Attributes:
        w_q: `(key, action)`; w_k: `(key, action)`; w_v: `(state, action)`.
    """

    w_q: Array
    w_k: Array
    w_v: Array

    def weights(self, actions: Float[Array, "horizon action"]) -> Array:
        """The attention weights c, row j over the actions 0 ... j."""
        logits = (actions @ self.w_q.T) @ (actions @ self.w_k.T).T
        causal = jnp.tril(jnp.ones(logits.shape, bool))
        return jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)

    def predict(self, s1: Array, actions: Array) -> Float[Array, "horizon state"]:
        """ŝ_2 ... ŝ_{H+1} from a_1 ... a_H (`s1` is ignored). Single example."""
        del s1
        return self.weights(actions) @ (actions @ self.w_v.T)


@eqx.filter_jit
def _jacobian(model, actions):
    jacobian = jax.jacfwd(model.predict, argnums=1)(jnp.zeros(()), actions)
    return jacobian, model.weights(actions)


def _corrected_bounds(model, weights, alpha):
    """The per-pair bound derived in `docs/theory.md`, and the row constant C."""
    v, q, k = (spectral_norm(w) for w in (model.w_v, model.w_q, model.w_k))
    logit = 2 * alpha**2 * q * k
    horizon = weights.shape[0]
    pairs = np.asarray(weights) * v * (1 + logit) + np.eye(horizon) * v * logit
    return pairs, v * (1 + 2 * logit)


def _printed_bounds(model, alpha, horizon):
    """The proof's per-pair bound ‖W_v‖ + α Σ_{i<t} ‖W_v‖ (t - 1 = j + 1 terms)."""
    v = spectral_norm(model.w_v)
    rows = v * (1 + alpha * (np.arange(horizon) + 1))
    return np.tril(np.broadcast_to(rows[:, None], (horizon, horizon)))


# (horizon, state, action, key)
SHAPES = [(6, 1, 1, 1), (10, 2, 3, 2), (8, 3, 2, 4)]


def _bounded_actions(rng, horizon, action, alpha):
    """Actions in the ball ‖a‖ ≤ α, a third of them on its boundary."""
    directions = rng.normal(size=(horizon, action))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    radii = alpha * np.where(
        rng.uniform(size=horizon) < 1 / 3, 1.0, rng.uniform(size=horizon)
    )
    return jnp.asarray(directions * radii[:, None])


@x64_settings
@given(
    shape=st.sampled_from(SHAPES),
    qk_scale=st.floats(0.1, 5.0),
    v_scale=st.floats(0.1, 2.0),
    alpha=st.floats(0.1, 2.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_corrected_per_pair_and_row_bounds(x64, shape, qk_scale, v_scale, alpha, seed):
    """The corrected per-pair bound, the row bound C and the total H C, with W_q
    and W_k up to five times their usual scale (where the printed bound fails)."""
    horizon, state, action, key = shape
    rng = np.random.default_rng(seed)
    model = AttentionAWM(
        random_matrix(rng, key, action, qk_scale),
        random_matrix(rng, key, action, qk_scale),
        random_matrix(rng, state, action, v_scale),
    )
    actions = _bounded_actions(rng, horizon, action, alpha)
    jacobian, weights = _jacobian(model, actions)
    norms = block_norms(jacobian)
    # Causal mask: later actions get weight exactly 0 and their logits are
    # replaced by -inf, so their tangents vanish exactly.
    np.testing.assert_array_equal(np.triu(norms, 1), 0.0)
    pairs, row_constant = _corrected_bounds(model, weights, alpha)
    assert_at_most(norms, np.tril(pairs), err_msg="per pair")
    assert_at_most(norms.sum(axis=1), row_constant, err_msg="row sum")
    # Summed over the H rows: O(H), hence the printed O(H³).
    assert_at_most(norms.sum(), horizon * row_constant, err_msg="total")


def test_printed_per_pair_bound_fails(x64):
    """Counterexample: values read the first coordinate, keys and queries the
    second. Both keys are equal, so c = (1/2, 1/2), and moving a_1's key moves
    the weights of two values that differ by 2 · 0.6, with logit slope
    q ‖W_k‖ = 0.8 w²: ∂ŝ_3/∂a_1 = (1/2, 0.5 · 0.6 · 0.8 w²)."""
    w = 10.0
    model = AttentionAWM(
        w_q=jnp.array([[0.0, w]]),
        w_k=jnp.array([[0.0, w]]),
        w_v=jnp.array([[1.0, 0.0]]),
    )
    actions = jnp.array([[0.6, 0.8], [-0.6, 0.8]])  # ‖a_i‖ = α = 1
    jacobian, _ = _jacobian(model, actions)
    # Closed form, float64 rounding only.
    np.testing.assert_allclose(jacobian[1, 0, 0], [0.5, 0.24 * w**2], rtol=1e-13)
    norms = block_norms(jacobian)
    printed = _printed_bounds(model, 1.0, 2)
    # ‖W_v‖(1 + α (t - 1)) = 3 at t = 3, against 24.005.
    assert norms[1, 0] > 8 * printed[1, 0]
    # The proof's total Σ_t Σ_k (‖W_v‖ + α(t-1)‖W_v‖) fails too at this horizon.
    assert norms.sum() > np.sum(printed)
    # The corrected bounds hold.
    pairs, row_constant = _corrected_bounds(model, _jacobian(model, actions)[1], 1.0)
    assert_at_most(norms, np.tril(pairs))
    assert_at_most(norms.sum(axis=1), row_constant)


def test_uniform_attention_total_is_linear(x64):
    """With W_q = 0 the weights are uniform, c_i = 1/t, and ∂ŝ_t/∂a_k = W_v/(t-1):
    each row sums to ‖W_v‖ and the total to H‖W_v‖. The O(H) bound is attained
    up to its constant; the printed O(H³) is loose by H²."""
    horizon, state, action = 40, 2, 3
    rng = np.random.default_rng(0)
    model = AttentionAWM(
        jnp.zeros((2, action)),
        random_matrix(rng, 2, action, 1.0),
        random_matrix(rng, state, action, 1.0),
    )
    actions = _bounded_actions(rng, horizon, action, 1.0)
    jacobian, _ = _jacobian(model, actions)
    norms = block_norms(jacobian)
    v = spectral_norm(model.w_v)
    # Sums of j + 1 copies of ‖W_v‖ / (j + 1): rounding only.
    np.testing.assert_allclose(norms.sum(axis=1), v, rtol=1e-12)
    assert norms.sum() == pytest.approx(horizon * v, rel=1e-12)


@eqx.filter_jit
def _closed_loop(model, policy, s1, goal, horizon: int):
    grad, seen, actions, states = closed_loop_gradient(model, policy, s1, goal, horizon)
    return grad, seen, actions, states, model.weights(actions)


@x64_settings
@given(
    shape=st.sampled_from(SHAPES[1:]),
    qk_scale=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_policy_gradient_is_linear_in_horizon(x64, shape, qk_scale, seed):
    """Through Thm. 2: ‖∇_θ J‖ ≤ L_r L_π H C, with L_r, L_π and α measured on the
    closed-loop trajectory of an MLP policy."""
    horizon, state, action, key = shape
    rng = np.random.default_rng(seed)
    model = AttentionAWM(
        random_matrix(rng, key, action, qk_scale),
        random_matrix(rng, key, action, qk_scale),
        random_matrix(rng, state, action, 1.0),
    )
    policy = TinyPolicy.init(jax.random.key(seed % 2**31), state, action, 8)
    s1, goal = (jnp.asarray(rng.normal(size=state)) for _ in range(2))
    grad, seen, actions, states, weights = _closed_loop(
        model, policy, s1, goal, horizon
    )
    alpha = float(np.max(np.linalg.norm(np.asarray(actions), axis=-1)))
    l_r = float(np.max(np.linalg.norm(np.asarray(states - goal), axis=-1)))
    _, row_constant = _corrected_bounds(model, weights, alpha)
    bound = l_r * policy_lipschitz(policy, seen) * horizon * row_constant
    assert_at_most(gradient_norm(grad), bound)
