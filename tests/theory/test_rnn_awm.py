"""Corollary 2.1 and its tightness (Appendix A.2) for the RNN Actions World Model of
eq. 4 of Ma et al. (2024):

    x_{t+1} = σ(W_x x_t) + W_a a_t + b,    ŝ_{t+1} = W_o x_{t+1},

with ‖diag σ'‖ ≤ 1/β. Printed: ‖∂ŝ_t/∂a_k‖ ≤ ‖W_o‖‖W_a‖η^{t-k-1}, η = ‖W_x‖/β, and
‖∇_θ J‖ = O(η^H); in the one-dimensional positive case with σ' ≥ γ > 0,
∂ŝ_t/∂a_k ≥ ‖W_o‖‖W_a‖(‖W_x‖γ)^{t-k} and ‖∇_θ J‖ ≥ L_r L_π ‖W_o‖‖W_a‖
(‖W_x‖γ)^{H-1}. The per-pair upper bound holds and is attained; the order
O(η^H) holds only for η > 1 (the proof's last step, O(H² η^H) = O(η^H), is never
valid; summing the series is); the ICLR proof's η = ρ(W_x)/β needs the norm, not
the spectral radius. The printed per-pair lower bound is one factor ‖W_x‖γ too
strong, which makes it false whenever ‖W_x‖γ > 1; the printed gradient-level
lower bound is false only above a threshold η*_H of ‖W_x‖γ, which rises from 1
at H = 2 to φ² = (3 + √5)/2 as H grows. Thm. 2 is an equality in A.2's setting
only when the reward and policy derivatives equal L_r and L_π at every visited
state and θ is a scalar. `docs/theory.md` has the derivations. Indices: see
`theory.common`.
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
    bpo_objective,
    generate,
    gradient_norm,
    lag_matrix,
    policy_lipschitz,
    random_matrix,
    spectral_norm,
    x64_settings,
)
from theory.ratios import record


class RNNAWM(eqx.Module):
    """The RNN AWM of eq. 4, with x_1 = W_s s1 and the activation
    σ(u) = gain · sigmoid(slope · u) + shift, so that tanh (2, 2, -1), the logistic
    sigmoid (1, 1, 0) and its rescalings share one compiled function.

    Attributes:
        w_s: `(hidden, state)`; w_x: `(hidden, hidden)`; w_a: `(hidden, action)`;
        b: `(hidden,)`; w_o: `(state, hidden)`; gain, slope, shift: scalars.
    """

    w_s: Array
    w_x: Array
    w_a: Array
    b: Array
    w_o: Array
    gain: Array
    slope: Array
    shift: Array

    def activation(self, u: Array) -> Array:
        return self.gain * jax.nn.sigmoid(self.slope * u) + self.shift

    def activation_derivative(self, u: Array) -> Array:
        p = jax.nn.sigmoid(self.slope * u)
        return self.gain * self.slope * p * (1.0 - p)

    @property
    def beta(self) -> float:
        """sup σ' = gain · slope / 4 = 1 / β."""
        return 4.0 / float(self.gain * self.slope)

    @property
    def eta(self) -> float:
        return spectral_norm(self.w_x) / self.beta

    def trajectory(self, s1: Array, actions: Float[Array, "horizon action"]):
        """The predicted states and the pre-activations W_x x_t, t = 1 ... H."""

        def body(x, a):
            pre = self.w_x @ x
            x_next = self.activation(pre) + self.w_a @ a + self.b
            return x_next, (self.w_o @ x_next, pre)

        _, (states, pre) = jax.lax.scan(body, self.w_s @ s1, actions)
        return states, pre

    def predict(self, s1: Array, actions: Array) -> Float[Array, "horizon state"]:
        """ŝ_2 ... ŝ_{H+1} from s1 and a_1 ... a_H. Single example."""
        return self.trajectory(s1, actions)[0]


ACTIVATIONS = {
    "tanh": (2.0, 2.0, -1.0),
    "sigmoid": (1.0, 1.0, 0.0),
    "scaled sigmoid": (3.0, 1.5, -1.5),
}

# (horizon, state, action, hidden): three shapes, so at most three compilations of
# each jitted function per property.
SHAPES = [(6, 1, 1, 1), (10, 2, 3, 4), (8, 3, 2, 5)]


def make_rnn(seed, shape, activation, x_scale, a_scale, dtype=jnp.float64):
    horizon, state, action, hidden = shape
    rng = np.random.default_rng(seed)
    gain, slope, shift = ACTIVATIONS[activation]
    return RNNAWM(
        w_s=random_matrix(rng, hidden, state, 1.0),
        w_x=random_matrix(rng, hidden, hidden, x_scale),
        w_a=random_matrix(rng, hidden, action, a_scale),
        b=jnp.asarray(rng.normal(0.0, 0.3, hidden)),
        w_o=random_matrix(rng, state, hidden, 1.0),
        gain=jnp.asarray(gain, dtype),
        slope=jnp.asarray(slope, dtype),
        shift=jnp.asarray(shift, dtype),
    )


@eqx.filter_jit
def _jacobian(model, s1, actions):
    """d predict / d actions, shape `(horizon, state, horizon, action)`, and the
    pre-activations."""
    jacobian = jax.jacfwd(model.predict, argnums=1)(s1, actions)
    return jacobian, model.trajectory(s1, actions)[1]


@eqx.filter_jit
def _closed_loop(model, policy, s1, goal, horizon: int):
    """∇_θ J for the reward -‖s - goal‖² / 2, the states the policy saw and the
    predicted states. (`eqx.filter_jit` makes the int `horizon` static.)"""
    seen = generate(model.predict, policy, s1, horizon, policy.b2.shape[0])

    def reward(state):
        return -0.5 * jnp.sum((state - goal) ** 2)

    grad = eqx.filter_grad(bpo_objective)(policy, model.predict, reward, seen, s1)
    return grad, seen, model.predict(s1, jax.vmap(policy)(seen))


def _upper_bounds(model, horizon):
    """‖W_o‖‖W_a‖η^{j-i} for every pair (zero above the diagonal)."""
    scale = spectral_norm(model.w_o) * spectral_norm(model.w_a)
    causal = np.tril(np.ones((horizon, horizon)))
    return causal * scale * model.eta ** lag_matrix(horizon)


@x64_settings
@given(
    shape=st.sampled_from(SHAPES),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    x_scale=st.floats(0.1, 3.0),
    a_scale=st.floats(0.1, 2.0),
    amplitude=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_per_pair_upper_bound(
    x64, shape, activation, x_scale, a_scale, amplitude, seed
):
    """‖∂ŝ_t/∂a_k‖ ≤ ‖W_o‖‖W_a‖η^{t-k-1} for random sizes, weights, actions and
    activations, contracting (η < 1) and expanding (η > 1)."""
    model = make_rnn(seed, shape, activation, x_scale, a_scale)
    horizon, state, action, _ = shape
    rng = np.random.default_rng(seed + 1)
    s1 = jnp.asarray(rng.normal(size=state))
    actions = jnp.asarray(amplitude * rng.uniform(-1, 1, (horizon, action)))
    jacobian, _ = _jacobian(model, s1, actions)
    norms = block_norms(jacobian)
    # Causality of an AWM: ŝ_t reads a_{1:t-1} only. Forward-mode tangents of
    # later actions never reach earlier states, so these blocks are exact zeros.
    np.testing.assert_array_equal(np.triu(norms, 1), 0.0)
    # Cor. 2.1: a product of t-k-1 factors diag(σ') W_x between W_o and W_a.
    bounds = _upper_bounds(model, horizon)
    record("cor21_pair", norms, bounds)
    assert_at_most(norms, bounds, err_msg=activation)


def test_per_pair_upper_bound_is_attained(x64):
    # 1-D tanh at the origin (s1 = 0, b = 0, a = 0) stays at the origin, where
    # σ' = 1 = 1/β: every factor of the product equals its bound, and
    # ∂ŝ_t/∂a_k = W_o W_a w^{t-k-1} exactly. A bound with any other exponent
    # (t - k, say) would fail here for w < 1.
    horizon, w = 12, 0.7
    model = make_rnn(0, (horizon, 1, 1, 1), "tanh", 1.0, 1.0)
    model = eqx.tree_at(
        lambda m: (m.w_x, m.w_a, m.w_o, m.b),
        model,
        (jnp.array([[w]]), jnp.array([[1.5]]), jnp.array([[-0.8]]), jnp.zeros(1)),
    )
    jacobian, _ = _jacobian(model, jnp.zeros(1), jnp.zeros((horizon, 1)))
    record("cor21_pair", block_norms(jacobian), _upper_bounds(model, horizon))
    np.testing.assert_allclose(
        block_norms(jacobian),
        _upper_bounds(model, horizon),
        rtol=1e-13,  # the same product of float64 scalars, in another order
    )


def test_spectral_radius_does_not_bound_the_blocks(x64):
    """The ICLR proof of its Cor. 1.1 writes η = ρ(W_xᵀ)/β "in the case of the
    2-norm"; that holds for a normal W_x only. A nilpotent W_x has ρ = 0, so the
    bound ‖W_o‖‖W_a‖(ρ/β)^{t-k-1} vanishes at every lag ≥ 1, while at the origin
    of a tanh RNN (σ' = 1 = 1/β) ∂ŝ_t/∂a_{t-2} = W_o W_x W_a = 2. The norm
    bound, η = ‖W_x‖/β = 2, holds. (The ICLR premise ρ(W_x) > β does imply
    ‖W_x‖ > β, hence η > 1: only the identity is wrong, not the conclusion.)"""
    horizon = 6
    model = make_rnn(0, (horizon, 1, 1, 2), "tanh", 1.0, 1.0)
    model = eqx.tree_at(
        lambda m: (m.w_x, m.w_a, m.w_o, m.b, m.w_s),
        model,
        (
            jnp.array([[0.0, 2.0], [0.0, 0.0]]),
            jnp.array([[0.0], [1.0]]),
            jnp.array([[1.0, 1.0]]),
            jnp.zeros(2),
            jnp.zeros((2, 1)),
        ),
    )
    rho = float(np.max(np.abs(np.linalg.eigvals(np.asarray(model.w_x)))))
    assert rho == 0.0 and model.eta == 2.0
    jacobian, pre = _jacobian(model, jnp.zeros(1), jnp.zeros((horizon, 1)))
    np.testing.assert_array_equal(pre, 0.0)  # the trajectory is the origin
    norms = block_norms(jacobian)
    # W_o W_x^d W_a: 1 at lag 0, 2 at lag 1, 0 beyond (exact in float64).
    lags = lag_matrix(horizon)
    causal = np.tril(np.ones((horizon, horizon), bool))
    expected = np.select([lags == 0, lags == 1], [1.0, 2.0], 0.0)
    np.testing.assert_array_equal(norms[causal], expected[causal])
    scale = spectral_norm(model.w_o) * spectral_norm(model.w_a)
    with_rho = np.where(causal, scale * rho**lags, 0.0)
    record("cor21_spectral_radius", norms[lags == 1], with_rho[lags == 1])
    assert np.all(norms[lags == 1] > with_rho[lags == 1])
    assert_at_most(norms, _upper_bounds(model, horizon))


@x64_settings
@given(
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    x_scale=st.floats(0.2, 2.5),
    seed=st.integers(0, 2**32 - 1),
)
def test_policy_gradient_upper_bound(x64, activation, x_scale, seed):
    """Cor. 2.1 at the level of the policy gradient, through Thm. 2:
    ‖∇_θ J‖ ≤ L_r L_π ‖W_o‖‖W_a‖ Σ_{pairs} η^{t-k-1}, with L_r, L_π measured.
    (One shape, a vector state, action and hidden state: the per-pair property
    covers the others, and each shape compiles the closed loop anew.)"""
    shape = SHAPES[1]
    model = make_rnn(seed, shape, activation, x_scale, 1.0)
    horizon, state, action, _ = shape
    policy = TinyPolicy.init(jax.random.key(seed % 2**31), state, action, 8)
    rng = np.random.default_rng(seed + 2)
    s1 = jnp.asarray(rng.normal(size=state))
    goal = jnp.asarray(rng.normal(size=state))
    grad, seen, states = _closed_loop(model, policy, s1, goal, horizon)
    l_r = float(np.max(np.linalg.norm(np.asarray(states - goal), axis=-1)))
    l_pi = policy_lipschitz(policy, seen)
    bound = l_r * l_pi * np.sum(_upper_bounds(model, horizon))
    record("cor21_gradient", gradient_norm(grad), bound)
    assert_at_most(gradient_norm(grad), bound, err_msg=activation)


class ScalarPolicy(eqx.Module):
    """π_θ(s) = L_π θ + c tanh(s): ∂π/∂θ = L_π everywhere, as A.2 assumes."""

    theta: Array
    l_pi: Array
    feedback: Array

    def __call__(self, state: Array) -> Array:
        return self.l_pi * self.theta + self.feedback * jnp.tanh(state)


@eqx.filter_jit
def _scalar_gradient(model, policy, s1, l_r, horizon: int):
    """J(θ) = Σ_t L_r ŝ_t through the 1-D model, ∂J/∂θ, and the Jacobian and
    pre-activations on the trajectory."""
    seen = generate(model.predict, policy, s1, horizon, 1)

    def objective(theta):
        return bpo_objective(
            eqx.tree_at(lambda p: p.theta, policy, theta),
            model.predict,
            lambda s: l_r * s[0],
            seen,
            s1,
        )

    grad = jax.grad(objective)(policy.theta)
    actions = jax.vmap(policy)(seen)
    jacobian, pre = _jacobian(model, s1, actions)
    return grad, jacobian, pre


@x64_settings
@given(
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    w=st.floats(0.2, 4.0),
    w_a=st.floats(0.1, 2.0),
    w_o=st.floats(0.1, 2.0),
    theta=st.floats(-1.0, 1.0),
    feedback=st.floats(-1.0, 1.0),
    s1=st.floats(-2.0, 2.0),
)
def test_one_dimensional_lower_bound(x64, activation, w, w_a, w_o, theta, feedback, s1):
    """App. A.2, corrected: in 1-D with W_x, W_a, W_o > 0 and σ' ≥ γ > 0 on the
    visited pre-activations, ∂ŝ_t/∂a_k ≥ W_o W_a (W_x γ)^{t-k-1}, and the policy
    gradient equals L_r L_π Σ ∂ŝ_t/∂a_k (Thm. 2 with equality)."""
    horizon = 8
    model = make_rnn(0, (horizon, 1, 1, 1), activation, 1.0, 1.0)
    model = eqx.tree_at(
        lambda m: (m.w_x, m.w_a, m.w_o),
        model,
        (jnp.array([[w]]), jnp.array([[w_a]]), jnp.array([[w_o]])),
    )
    l_r, l_pi = 0.7, 1.3
    policy = ScalarPolicy(jnp.array([theta]), jnp.asarray(l_pi), jnp.asarray(feedback))
    grad, jacobian, pre = _scalar_gradient(model, policy, jnp.array([s1]), l_r, horizon)
    derivatives = np.asarray(jacobian)[:, 0, :, 0]
    # The pre-activation W_x x_1 is on no path from an action (x_1 = W_s s1).
    gamma = float(np.min(model.activation_derivative(pre[1:])))
    lower = w_o * w_a * (w * gamma) ** lag_matrix(horizon)
    causal = np.tril(np.ones((horizon, horizon), bool))
    record("a2_pair", derivatives[causal], lower[causal])
    assert_at_most(lower[causal], derivatives[causal])
    # All paths carry positive factors, ∂π/∂θ = L_π and ∂r/∂s = L_r at every
    # state, and θ is a scalar, so the triangle and Cauchy-Schwarz steps of
    # Thm. 2 are equalities; the same float64 sum in two orders (1e-12).
    theorem_2 = l_r * l_pi * np.sum(derivatives[causal])
    record("a2_equality", float(grad[0]), theorem_2)
    np.testing.assert_allclose(float(grad[0]), theorem_2, rtol=1e-12)
    assert_at_most(l_r * l_pi * lower[-1, 0], float(grad[0]))


def _origin_model(horizon, w):
    """1-D tanh RNN with W_a = W_o = 1, b = 0: at θ = 0 it stays at the origin,
    where γ = σ'(0) = 1 = 1/β, so ∂ŝ_t/∂a_k = w^{t-k-1} and η = ‖W_x‖γ = w."""
    model = make_rnn(0, (horizon, 1, 1, 1), "tanh", 1.0, 1.0)
    return eqx.tree_at(
        lambda m: (m.w_x, m.w_a, m.w_o, m.b, m.w_s),
        model,
        (
            jnp.array([[w]]),
            jnp.ones((1, 1)),
            jnp.ones((1, 1)),
            jnp.zeros(1),
            jnp.ones((1, 1)),
        ),
    )


def _origin_gradient(horizon, w):
    """∂J/∂θ at θ = 0 for J = Σ_t ŝ_t (L_r = 1) and π_θ(s) = θ (L_π = 1)."""
    model = _origin_model(horizon, w)
    policy = ScalarPolicy(jnp.zeros(1), jnp.asarray(1.0), jnp.asarray(0.0))
    grad, jacobian, pre = _scalar_gradient(model, policy, jnp.zeros(1), 1.0, horizon)
    np.testing.assert_array_equal(pre, 0.0)  # the trajectory is the origin
    return float(grad[0]), np.asarray(jacobian)[:, 0, :, 0]


def test_printed_lower_bound_is_one_factor_too_strong(x64):
    """Counterexample to App. A.2 as printed: with W_x γ = 4 > 1 the exact value
    w^{t-k-1} is below the printed w^{t-k} at every pair, and the gradient is
    below the printed L_r L_π ‖W_o‖‖W_a‖(‖W_x‖γ)^{H-1}."""
    horizon, w = 8, 4.0
    grad, derivatives = _origin_gradient(horizon, w)
    lags = lag_matrix(horizon)
    causal = np.tril(np.ones((horizon, horizon), bool))
    # Exact powers of 4 in float64.
    np.testing.assert_array_equal(derivatives[causal], (w**lags)[causal])
    printed = w ** (lags + 1)
    record("a2_printed_pair", derivatives[causal], printed[causal])
    assert np.all(derivatives[causal] * w == printed[causal])
    assert np.all(derivatives[causal] < printed[causal])
    # The paper's J sums r(ŝ_1) ... r(ŝ_{H'}) with H' = horizon + 1 states, so its
    # exponent H' - 1 is `horizon` here. Σ_{d<H}(H - d) 4^d < 4^H (16/9 · 4^{H-1}).
    expected = sum((horizon - d) * w**d for d in range(horizon))
    assert grad == pytest.approx(expected, rel=1e-14)
    assert grad < w**horizon
    # The corrected bound, exponent H' - 2 = horizon - 1, holds.
    assert grad >= w ** (horizon - 1)


def test_printed_order_fails_below_eta_one(x64):
    """Counterexample to ‖∇_θ J‖ = O(η^H) for η < 1: the direct terms
    ∂ŝ_{t}/∂a_{t-1} = W_o W_a alone make the gradient grow linearly in H, while
    η^H → 0. The correct order is O(H) for η < 1, O(H²) at η = 1."""
    horizon, w = 32, 0.5
    grad, derivatives = _origin_gradient(horizon, w)
    # The dynamics do not depend on the horizon: the gradient at horizon h is the
    # sum of the leading h x h block (linear reward, ∂π/∂θ = 1).
    causal = np.tril(derivatives)
    sums = np.array([np.sum(causal[:h, :h]) for h in range(1, horizon + 1)])
    assert sums[-1] == pytest.approx(grad, rel=1e-14)
    h = np.arange(1, horizon + 1)
    # Σ_{d<h} (h - d) w^d = 2h - 2 + 2^{1-h} for w = 1/2, exactly, up to rounding.
    np.testing.assert_allclose(sums, 2 * h - 2 + 2.0 ** (1 - h), rtol=1e-14)
    ratio = sums / w**h
    record("cor21_order", sums, w**h)
    assert np.all(np.diff(ratio) > 0) and ratio[-1] > 1e10
    # The derived bound Σ (h - d) η^d, with η = ‖W_x‖ / β = 0.5, is attained.
    bound = np.array([sum((k - d) * w**d for d in range(k)) for k in h])
    np.testing.assert_allclose(sums, bound, rtol=1e-14)


def _printed_threshold(states: int) -> float:
    """η*_H: with H = `states` states, the printed gradient-level lower bound
    S_H(η) ≥ η^{H-1} of App. A.2, S_H(η) = Σ_{d=0}^{H-2} (H - 1 - d) η^d, holds
    exactly for η ≤ η*_H. Dividing by η^{H-1}, the condition is
    Σ_{j=1}^{H-1} j η^{-j} ≥ 1, whose left side decreases in η: bisection."""
    j = np.arange(1, states)
    low, high = 1.0, 3.0  # at η = 1 the left side is H(H - 1)/2 ≥ 1; at 3, < 1
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if np.sum(j * mid**-j) >= 1 else (low, mid)
    return low


def test_printed_gradient_lower_bound_fails_only_above_a_threshold(x64):
    """App. A.2 at the level of the gradient, ‖∇_θ J‖ ≥ L_r L_π ‖W_o‖‖W_a‖
    (‖W_x‖γ)^{H-1}: on the 1-D tanh RNN at the origin, where every σ' = γ, the
    gradient is L_r L_π W_o W_a S_H(η) with η = W_x γ, so the printed bound holds
    for η ≤ η*_H and fails above it. η*_2 = 1, η*_3 = 2, and η*_H rises to
    φ² = (3 + √5)/2 as H grows (Σ_j j x^j = x/(1 - x)² = 1 at x = 1/φ²)."""
    thresholds = np.array([_printed_threshold(h) for h in (2, 3, 4, 9, 50)])
    np.testing.assert_allclose(thresholds[:2], [1.0, 2.0], rtol=1e-12)
    assert np.all(np.diff(thresholds) > 0)
    golden_squared = (3 + np.sqrt(5)) / 2
    assert thresholds[-1] < golden_squared
    assert thresholds[-1] == pytest.approx(golden_squared, rel=1e-12)
    horizon = 8  # H' = 9 states: η*_9 = 2.6149
    threshold = _printed_threshold(horizon + 1)
    for factor, holds in [(0.99, True), (1.01, False)]:
        w = factor * threshold
        grad, _ = _origin_gradient(horizon, w)
        printed = w**horizon  # L_r = L_π = W_o = W_a = 1, exponent H' - 1
        record("a2_gradient_threshold", grad, printed)
        # The exact gradient S_H(w) differs from the printed value by about 2%
        # of it here, far above float64 rounding.
        assert (grad >= printed) == holds, (factor, grad, printed)


class PairPolicy(eqx.Module):
    """π_θ(s) = θ_0 + θ_1 tanh(s): a two-dimensional θ."""

    theta: Array

    def __call__(self, state: Array) -> Array:
        return self.theta[:1] + self.theta[1:] * jnp.tanh(state)


@eqx.filter_jit
def _equality_case(model, policy, s1, l_r, curved: bool, horizon: int):
    """∇_θ J for J = Σ_t r(ŝ_t), r(s) = L_r s (`curved` false) or L_r tanh(s), the
    largest |r'| on the trajectory, and the Jacobian of `predict` there."""
    seen = generate(model.predict, policy, s1, horizon, 1)

    def reward(s):
        return l_r * (jnp.tanh(s[0]) if curved else s[0])

    grad = eqx.filter_grad(bpo_objective)(policy, model.predict, reward, seen, s1)
    actions = jax.vmap(policy)(seen)
    states = model.predict(s1, actions)
    slopes = jax.vmap(jax.grad(reward))(states)
    jacobian, _ = _jacobian(model, s1, actions)
    return grad, jnp.max(jnp.abs(slopes)), jacobian, seen


@pytest.mark.parametrize("unmet", ["curved reward", "two-dimensional θ"])
def test_theorem_2_is_strict_when_a2_conditions_fail(x64, unmet):
    """A.2 says Thm. 2 becomes an equality in the one-dimensional positive case.
    It also needs |∂r(ŝ_t)/∂ŝ_t| = L_r at every t and |∂π(ŝ_k)/∂θ| = L_π at every
    k with θ scalar (or all ∂π/∂θ parallel): with r = L_r tanh, or with a
    two-dimensional θ, the inequality is strict even with L_r and L_π measured
    on the trajectory, and even though every path carries positive factors."""
    horizon = 8
    model = _origin_model(horizon, 0.9)
    model = eqx.tree_at(lambda m: m.b, model, jnp.array([0.3]))  # leave the origin
    if unmet == "curved reward":
        policy = ScalarPolicy(jnp.array([0.2]), jnp.asarray(1.0), jnp.asarray(0.5))
    else:
        policy = PairPolicy(jnp.array([0.2, 0.5]))
    curved = unmet == "curved reward"
    grad, l_r, jacobian, seen = _equality_case(
        model, policy, jnp.zeros(1), 0.7, curved, horizon
    )
    derivatives = np.asarray(jacobian)[:, 0, :, 0]
    causal = np.tril(np.ones((horizon, horizon), bool))
    assert np.all(derivatives[causal] > 0)  # the positive case
    l_pi = policy_lipschitz(policy, seen)
    theorem_2 = float(l_r) * l_pi * np.sum(derivatives[causal])
    observed = gradient_norm(grad)
    record("a2_equality_unmet", observed, theorem_2)
    # Strict by far more than rounding: the ratios are 0.20 (curved reward)
    # and 0.87 (two-dimensional θ).
    assert observed < (1 - 1e-3) * theorem_2, (observed, theorem_2)
