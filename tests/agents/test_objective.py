"""The BPO objective by generate-then-re-evaluate equals the sequential unroll."""

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import pytest
from helpers import GRUModel, assert_close, sequential_objective

import agents
import diffenvs
import worldmodels

HORIZON = 8


@pytest.mark.parametrize("full_gradient", [False, True], ids=["sg", "full"])
@pytest.mark.parametrize("name", ["simulator", *worldmodels.names(), "user-gru"])
def test_objective_equals_sequential_unroll(x64, name, full_gradient):
    env = diffenvs.make("hiv", horizon=HORIZON)
    if name == "simulator":
        model = env
    elif name == "user-gru":
        model = GRUModel(env.state_dim, env.action_dim, key=jr.key(0))
    else:
        model = worldmodels.make(name, env, key=jr.key(0))
    policy = agents.TanhGaussianPolicy(env.state_dim, env.action_dim, key=jr.key(1))
    s1, key, alpha = env.initial_state(), jr.key(2), 0.1
    params, static = eqx.partition(policy, eqx.is_inexact_array)

    def ours(p):
        value, _ = agents.objective(
            eqx.combine(p, static), model, env, s1, key,
            entropy_coefficient=alpha, full_gradient=full_gradient,
        )  # fmt: skip
        return value

    def reference(p):
        return sequential_objective(
            eqx.combine(p, static), model, env, s1, key, alpha, stop=not full_gradient
        )

    value, grad = jax.value_and_grad(ours)(params)
    expected, expected_grad = jax.value_and_grad(reference)(params)
    # float64, the same operations in another order: far below 1e-9 relative.
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    for g, e in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad), strict=True):
        assert_close(g, e, rtol=1e-8)


def test_bpo_through_simulator_learns_credit_assignment():
    env = diffenvs.make("credit_assignment", horizon=50)
    result = agents.BPO(env, eval_every=1000).train(jr.key(1), env_steps=3000)
    # The optimum is 10; the random return is far below.
    assert result.metrics["eval_return"][-1] >= 9.5
    assert np.all(np.isfinite(result.metrics["grad_norm"]))
