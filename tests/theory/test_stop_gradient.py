"""The stop-gradient on the policy's input (arXiv eq. 1-3, ablated in App. F.1).

With a_k = π_θ(sg[ŝ_k]) the policy gradient through an Actions World Model is
Σ_t ∂r/∂ŝ_t Σ_k ∂g_t/∂a_k ∂π_θ(ŝ_k)/∂θ: only the model's own action-to-state
paths, which Thm. 2 and Cor. 2.1-2.2 bound. Without it (the "full gradient")

    dŝ_t/dθ = Σ_{k<t} ∂g_t/∂a_k (∂π_θ(ŝ_k)/∂θ + ∂π_θ(ŝ_k)/∂s · dŝ_k/dθ),

the recursion of Thm. 1 with local state sensitivity ∂g_t/∂a_k ∂π/∂s: through the
policy, every earlier prediction becomes an input of every later one, and the
AWM's gradient has the circuitous paths of a History World Model. For a linear
integrator AWM and a policy with feedback κ the two gradients are known in closed
form: quadratic in H with the stop-gradient, exponential, (1 + κ)^H, without.

The package's objective (`agents.objective`) offers both; on its transformer AWM
the two have the same value, different gradients, and the same gradient when the
policy ignores the state.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import make_float64
from jax.flatten_util import ravel_pytree
from theory.ratios import record

import agents
import diffenvs
import worldmodels

MODEL = "awm-transformer"


class Integrator(worldmodels.AbstractWorldModel):
    """The AWM ŝ_{t+1} = s1 + Σ_{k≤t} a_k (1-D): every ∂ŝ_t/∂a_k is 1."""

    def predict(self, s1, actions):
        return s1 + jnp.cumsum(actions, axis=0)


class FeedbackPolicy(eqx.Module):
    """a = θ + κ s."""

    theta: jax.Array
    feedback: jax.Array

    def __call__(self, state):
        return self.theta + self.feedback * state


@eqx.filter_jit
def _integrator_gradients(policy, horizon: int):
    """∂J/∂θ of J = Σ_t ŝ_t through the integrator from s1 = 0, differentiating
    the closed-loop unroll with and without the stop-gradient."""
    model = worldmodels.incremental(Integrator(), 1)

    def objective(theta, stop: bool):
        policy_theta = eqx.tree_at(lambda p: p.theta, policy, theta)

        def act(seen, key):
            state = seen[:-1]
            return policy_theta(jax.lax.stop_gradient(state) if stop else state)

        trajectory = diffenvs.closed_loop(model, act, jnp.zeros(1), jr.key(0), horizon)
        return jnp.sum(trajectory.states)

    return [jax.grad(objective)(policy.theta, stop)[0] for stop in (True, False)]


def test_without_stop_gradient_an_awm_gradient_compounds(x64):
    """Integrator AWM, a = θ + κ ŝ, H steps. With the stop-gradient,
    dŝ_{j+1}/dθ = j + 1 and ∇θ J = H(H + 1)/2. Without it, d_j = (1 + κ) d_{j-1}
    + 1, so d_j = ((1 + κ)^{j+1} - 1)/κ and ∇θ J = ((1 + κ)((1 + κ)^H - 1)/κ -
    H)/κ: exponential in H although every ∂ŝ_t/∂a_k of the model is 1."""
    kappa = 0.1
    policy = FeedbackPolicy(jnp.zeros(1), jnp.asarray(kappa))
    ratios = []
    for horizon in (15, 30, 60):
        stopped, full = (float(g) for g in _integrator_gradients(policy, horizon))
        growth = 1 + kappa
        closed_form = (growth * (growth**horizon - 1) / kappa - horizon) / kappa
        # Sums and products of H terms in float64: rounding only.
        assert stopped == pytest.approx(horizon * (horizon + 1) / 2, rel=1e-12)
        assert full == pytest.approx(closed_form, rel=1e-12)
        if horizon == 30:
            record("stop_gradient", full, stopped)
        ratios.append(full / stopped)
    # The ratio itself grows (like (1 + κ)^H / H²): 1.7, 3.2, 17.9.
    assert np.all(np.diff(ratios) > 0) and ratios[-1] > 15


@eqx.filter_jit
def _objective_gradients(policy, model, env, s1, key):
    def value(policy, full):
        return agents.objective(policy, model, env, s1, key, full_gradient=full)[0]

    return [eqx.filter_value_and_grad(value)(policy, full) for full in (False, True)]


def _flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(eqx.filter(tree, eqx.is_inexact_array))[0])


@pytest.mark.parametrize("state_blind", [False, True])
def test_the_package_objective_with_and_without_stop_gradient(x64, state_blind):
    """`agents.objective` through the transformer AWM: the same value either way
    (the same episode), different gradients (the full one adds the paths through
    ∂π/∂s); with the first layer's state weights zeroed the policy ignores the
    state, ∂π/∂s = 0, and the two gradients coincide."""
    env = make_float64("invasive_plant", 10)
    model = worldmodels.make(MODEL, env, key=jr.key(0))
    # Larger weights than the initialisation's, so that states depend on actions
    # by O(1) and the extra paths are visible.
    model = jax.tree.map(lambda x: 3 * x if eqx.is_inexact_array(x) else x, model)
    policy = agents.TanhGaussianPolicy(env.state_dim, env.action_dim, key=jr.key(1))
    if state_blind:
        first = policy.mlp.layers[0]
        policy = eqx.tree_at(
            lambda p: p.mlp.layers[0].weight,
            policy,
            first.weight.at[:, : env.state_dim].set(0.0),
        )
    (v_stop, g_stop), (v_full, g_full) = _objective_gradients(
        policy, model, env, env.initial_state(), jr.key(2)
    )
    g_stop, g_full = _flat(g_stop), _flat(g_full)
    # The same episode, generated step by step either way, and its rewards from
    # the parallel `predict` or from the step-by-step states: rounding only.
    assert float(v_full) == pytest.approx(float(v_stop), rel=1e-12)
    difference = np.linalg.norm(g_full - g_stop) / np.linalg.norm(g_stop)
    if state_blind:
        # The extra paths are multiplied by an exact zero; what remains is one
        # gradient computed along two routes (1e-10 of its norm in float64).
        assert difference <= 1e-10
    else:
        # Measured: 0.88, the full gradient being 1.5 times as long.
        assert difference > 0.1, difference
