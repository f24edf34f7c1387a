"""Step-by-step rollouts whose carry holds a transformer's key-value cache. Their
derivatives read the final cache (`worldmodels._rollout`); here they are checked
against scanning `step` under plain automatic differentiation, which stores every
step's cache."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from helpers import assert_close, make_float64

import diffenvs
import worldmodels

# The reference: `step` scanned, differentiated by JAX alone (the route of a
# carry without a cache).
from worldmodels._rollout import _plain_scan as plain_scan

# The built-in models whose step carries a key-value cache.
CACHED = ["hwm-transformer", "awm-transformer"]


def lively(model):
    """`model` with its backbone's weights scaled up: attention far from uniform
    and the steps strongly coupled, so that a step reading a wrong row of the
    cache, or a lost tangent, shows in the result."""
    scale = lambda x: 5 * x if eqx.is_inexact_array(x) else x  # noqa: E731
    return eqx.tree_at(lambda m: m.backbone, model, jax.tree.map(scale, model.backbone))


@pytest.mark.parametrize("name", CACHED)
def test_derivatives_equal_plain_scan(x64, name):
    env = make_float64("double_pendulum", horizon=40)
    model = lively(worldmodels.make(name, env, key=jr.key(0)))
    s1 = env.initial_state()
    actions = jr.uniform(jr.key(1), (40, env.action_dim), minval=-1, maxval=1)
    weights = jr.normal(jr.key(2), (40, env.state_dim))

    def loss(run):
        return lambda args: jnp.sum(jnp.sin(run(*args)) * weights)

    rollout = eqx.filter_jit(worldmodels.unroll)
    reference = eqx.filter_jit(plain_scan)
    assert_close(rollout(model, s1, actions), reference(model, s1, actions), rtol=1e-12)

    args = (model, s1, actions)
    got = eqx.filter_jit(eqx.filter_grad(loss(worldmodels.unroll)))(args)
    want = eqx.filter_jit(eqx.filter_grad(loss(plain_scan)))(args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w, rtol=1e-10)

    # Forward mode, with respect to the actions and to every parameter at once.
    tangents = (
        jax.tree.map(
            lambda x: (
                jr.normal(jr.key(3), x.shape) if eqx.is_inexact_array(x) else None
            ),
            model,
        ),
        None,
        jr.normal(jr.key(4), actions.shape),
    )
    forward = eqx.filter_jit(lambda run: eqx.filter_jvp(run, args, tangents)[1])
    assert_close(forward(worldmodels.unroll), forward(plain_scan), rtol=1e-10)


def test_hwm_predict_takes_the_cached_route(x64):
    """An HWM's `predict` is its rollout; with a transformer it is the cached one
    (a second-order derivative through it too)."""
    env = make_float64("double_pendulum", horizon=20)
    model = lively(worldmodels.make("hwm-transformer", env, key=jr.key(0)))
    s1 = env.initial_state()
    actions = jr.uniform(jr.key(1), (20, env.action_dim), minval=-1, maxval=1)
    direction = jr.normal(jr.key(2), actions.shape)

    def hessian_vector(run):
        grad = jax.grad(lambda a: jnp.sum(jnp.sin(run(model, s1, a))))
        return jax.jvp(grad, (actions,), (direction,))[1]

    got = hessian_vector(lambda m, s, a: m.predict(s, a))
    assert_close(got, hessian_vector(plain_scan), rtol=1e-10)


def scratch_bytes(run, model, env, horizon: int) -> int:
    """XLA's scratch memory for the gradient of a loss on `run` over `horizon`
    steps, from the compiled program (no timing)."""
    params, static = eqx.partition(model, eqx.is_array)
    s1, actions = env.initial_state(), jnp.zeros((horizon, env.action_dim))
    loss = lambda p: jnp.sum(run(eqx.combine(p, static), s1, actions))  # noqa: E731
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_derivative_memory_is_linear_in_horizon():
    """From H = 64 to 256 the gradient's scratch memory grows about 4x through the
    cached rollout (O(H)), against about 16x when every step's cache is stored
    (O(H²)), which shows that the measure can tell the two apart."""
    env = diffenvs.make("double_pendulum", horizon=256)
    model = worldmodels.make("hwm-transformer", env, key=jr.key(0))
    predict = lambda m, s, a: m.predict(s, a)  # noqa: E731
    growth = {
        name: scratch_bytes(run, model, env, 256) / scratch_bytes(run, model, env, 64)
        for name, run in [("cached", predict), ("plain", plain_scan)]
    }
    assert growth["plain"] > 12, growth
    assert growth["cached"] < 5, growth
