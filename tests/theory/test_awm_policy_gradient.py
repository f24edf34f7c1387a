"""Thm. 2 on the package's own Actions World Models, and the polynomial growth of
the transformer AWM's Jacobian sum (Cor. 2.2) set against the simulator's
exponential growth on `double_pendulum`.

Thm. 2 (arXiv §4, App. A): for any AWM g, with the policy input stop-gradiented,
    ‖∇θ J‖ ≤ L_r · L_π · Σ_t Σ_{k<t} ‖∂g(s1, a_{1:t-1}) / ∂a_k‖,
where J = Σ_t r(ŝ_t), L_r bounds ‖∂r/∂s‖ and L_π bounds ‖∂π_θ(s)/∂θ‖ (the proof
uses the latter, not a Lipschitz constant in s). In the package's row indexing
(states[t] follows actions[t]) the pairs k < t of the paper are the pairs k ≤ t.

The reward r(s) = w·s has ∂r/∂s = w exactly, so L_r = ‖w‖; the policy
π_θ(s) = W s + b has ‖∂π(s)/∂θ‖ = sqrt(‖s‖² + 1) exactly (the derivative with
respect to (W, b) of W s + b maps (dW, db) to dW s + db), so L_π is its maximum
over the states the policy reads.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, strategies as st
from theory.common import block_norms

import diffenvs
import worldmodels

AWMS = [name for name in worldmodels.names() if name.startswith("awm-")]
TASK = "invasive_plant"  # 5 state and 5 action dimensions: no scalar shortcuts
HORIZON = 10


class LinearPolicy(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, state):
        return self.weight @ state + self.bias


@eqx.filter_jit
def policy_gradient_and_bound(model, policy, s1, w):
    """The BPO gradient of J = Σ_t w·ŝ_t (METHOD §4: generate without gradient,
    then re-evaluate with a = π_θ(sg[ŝ]) through one parallel `predict`) and the
    right-hand side of Thm. 2 with the exact L_r and L_π."""

    def generate(policy):
        trajectory = diffenvs.closed_loop(
            worldmodels.incremental(model),
            lambda seen, key: policy(seen[:-1]),
            s1,
            jr.key(0),
            HORIZON,
        )
        return trajectory.observations[:, :-1], trajectory.actions

    inputs, actions = jax.lax.stop_gradient(generate(policy))

    def objective(policy):
        actions = jax.vmap(policy)(inputs)  # inputs are constants: sg[ŝ_k]
        return jnp.sum(model.predict(s1, actions) @ w)

    grads = jax.grad(objective)(policy)
    grad_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    jacobian = jax.jacrev(model.predict, argnums=1)(s1, actions)
    l_pi = jnp.sqrt(jnp.max(jnp.sum(inputs**2, axis=1)) + 1.0)
    return grad_norm, jacobian, l_pi, jnp.linalg.norm(w), actions, inputs


@pytest.mark.parametrize("name", AWMS)
@given(seed=st.integers(0, 2**31 - 1), policy_scale=st.floats(0.01, 2.0))
def test_theorem_2_bounds_the_policy_gradient(name, seed, policy_scale):
    env = diffenvs.make(TASK, horizon=HORIZON)
    model_key, policy_key, reward_key, state_key = jr.split(jr.key(seed), 4)
    model = worldmodels.make(name, env, key=jr.key(0))
    # A fitted-looking normaliser, so that states are not all of order 1.
    model = eqx.tree_at(
        lambda m: m.normaliser,
        model,
        worldmodels.Normaliser(jnp.full(5, 3.0), jnp.full(5, 2.0)),
    )
    model = jax.tree.map(
        lambda x: (
            x * (1 + 0.1 * jr.normal(model_key, x.shape))
            if eqx.is_inexact_array(x)
            else x
        ),
        model,
    )
    weight_key, bias_key = jr.split(policy_key)
    policy = LinearPolicy(
        policy_scale * jr.normal(weight_key, (5, 5)) / 5,
        policy_scale * jr.normal(bias_key, (5,)),
    )
    s1 = jr.normal(state_key, (5,))
    w = jr.normal(reward_key, (5,))
    grad_norm, jacobian, l_pi, l_r, _, _ = policy_gradient_and_bound(
        model, policy, s1, w
    )
    norms = block_norms(jacobian)
    assert np.all(np.triu(norms, k=1) == 0.0)  # causality: k > t contributes 0
    bound = float(l_r * l_pi) * norms.sum()
    # float32 throughout: the gradient and the Jacobian are computed along
    # different routes; 1e-5 relative covers their rounding.
    assert float(grad_norm) <= bound * (1 + 1e-5), (float(grad_norm), bound)
    assert float(grad_norm) > 0.0


def test_theorem_2_is_an_equality_in_the_1d_positive_case():
    """With one state, one action, w = 1 and a policy a = θ (so ∂π/∂θ = 1) the
    triangle inequalities of the proof are equalities when every ∂ŝ_t/∂a_k has
    the same sign: then ‖∇θ J‖ = Σ_t Σ_k |∂ŝ_t/∂a_k|. A linear AWM
    ŝ_{t+1} = s1 + c Σ_{k≤t} a_k with c > 0 has that property."""

    class Linear(eqx.Module):
        c: jax.Array

        def predict(self, s1, actions):
            return s1 + self.c * jnp.cumsum(actions, axis=0)

    model = Linear(jnp.array([[0.7]]))
    s1 = jnp.zeros(1)

    def objective(theta):
        actions = jnp.full((HORIZON, 1), theta)
        return jnp.sum(model.predict(s1, actions))

    grad = jax.grad(objective)(0.3)
    jacobian = jax.jacrev(model.predict, argnums=1)(s1, jnp.zeros((HORIZON, 1)))
    np.testing.assert_allclose(abs(grad), block_norms(jacobian).sum(), rtol=1e-6)


@eqx.filter_jit
def jacobian_sum(model, s1, actions):
    jacobian = jax.jacrev(model.predict, argnums=1)(s1, actions)
    blocks = jacobian.transpose(0, 2, 1, 3)
    return jnp.sum(jnp.linalg.norm(blocks, ord=2, axis=(-2, -1)))


@given(seed=st.integers(0, 2**31 - 1))
def test_transformer_awm_jacobian_sum_grows_polynomially(seed):
    """On double_pendulum (the chaotic task of Fig. 4) the simulator's
    ‖∂x_H/∂a_0‖ grows exponentially with H (tests/diffenvs/test_tasks.py and
    test_chaos_scaling.py); a transformer AWM's whole Jacobian sum
    Σ_t Σ_{k≤t} ‖∂ŝ_t/∂a_k‖ grows at most like H³ (Cor. 2.2).

    Measured on prefixes of one model built for the longest horizon (causality
    makes a prefix's predictions those of a shorter episode). The fitted
    log-log slope must not exceed 3; an exponential e^{λH} over H = 10 ... 80
    would show as a slope that grows with H, so the slope of the last doubling
    is checked too.
    """
    horizons = (10, 20, 40, 80)
    env = diffenvs.make("double_pendulum", horizon=horizons[-1])
    model_key, action_key = jr.split(jr.key(seed))
    model = worldmodels.make("awm-transformer", env, key=model_key)
    actions = jr.uniform(action_key, (horizons[-1], 1), minval=-1, maxval=1)
    s1 = env.initial_state()
    sums = np.array([float(jacobian_sum(model, s1, actions[:h])) for h in horizons])
    assert np.all(np.isfinite(sums)) and np.all(sums > 0)
    slopes = np.diff(np.log(sums)) / np.diff(np.log(horizons))
    overall = np.polyfit(np.log(horizons), np.log(sums), 1)[0]
    assert overall <= 3.0, (sums, slopes)
    assert slopes[-1] <= 3.0, (sums, slopes)
