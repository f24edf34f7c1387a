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
import worldmodels._rollout

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


@pytest.fixture(params=[1024, 13], ids=["one-segment", "3-segments"])
def segments(request, monkeypatch):
    """Rollouts through a cache run in segments of growing buffers, by default
    only from H = 256 on; the shortest segment set here gives H = 40 one segment
    or three of unequal lengths (13, 13, 14)."""
    monkeypatch.setattr(worldmodels._rollout, "_SEGMENT", request.param)


@pytest.mark.parametrize("name", CACHED)
def test_derivatives_equal_plain_scan(x64, segments, name):
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
    # Each gradient against its whole array's magnitude: the column of an MLP
    # output weight that belongs to a saturated GELU unit is ~1e-9 of the others,
    # and the unit's output there is the remainder of a cancellation (1 + tanh(u)
    # for u << 0), known to ~1e-9 relative in float64. A segmented rollout sums
    # attention over shorter rows, which moves that column by ~1e-9 of itself,
    # while every array agrees to ~1e-14 of its own magnitude.
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g.ravel(), w.ravel(), rtol=1e-10)

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


def test_hwm_predict_takes_the_cached_route(x64, monkeypatch):
    """An HWM's `predict` is its rollout; with a transformer it is the cached one
    (a second-order derivative through it too), here in three segments."""
    monkeypatch.setattr(worldmodels._rollout, "_SEGMENT", 6)
    env = make_float64("double_pendulum", horizon=20)
    model = lively(worldmodels.make("hwm-transformer", env, key=jr.key(0)))
    s1 = env.initial_state()
    actions = jr.uniform(jr.key(1), (20, env.action_dim), minval=-1, maxval=1)
    direction = jr.normal(jr.key(2), actions.shape)

    def hessian_vector(run):
        grad = jax.grad(lambda a: jnp.sum(jnp.sin(run(model, s1, a))))
        return jax.jit(lambda a, d: jax.jvp(grad, (a,), (d,))[1])(actions, direction)

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


def test_derivative_memory_is_linear_in_horizon(monkeypatch):
    """The gradient's scratch memory is linear in H through the cached rollout and
    quadratic when every step's cache is stored. Constant parts (each segment has
    its own loop and buffers) cancel in the increments: from H = 64 to 128 to 256
    the second increment is 2x the first when memory is linear, 4x when quadratic.
    The cached rollout is measured with four segments at every H; the plain scan
    shows that the measure tells the two apart."""
    env = diffenvs.make("double_pendulum", horizon=256)
    model = worldmodels.make("hwm-transformer", env, key=jr.key(0))

    def growth(run):
        small, medium, large = (
            scratch_bytes(run, model, env, h) for h in (64, 128, 256)
        )
        return (large - medium) / (medium - small)

    growths = {"plain": growth(plain_scan)}
    predict = lambda m, s, a: m.predict(s, a)  # noqa: E731
    monkeypatch.setattr(worldmodels._rollout, "_SEGMENT", 16)
    growths["cached"] = growth(predict)
    assert growths["plain"] > 3.5, growths
    assert growths["cached"] < 2.5, growths
