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
from worldmodels._rollout import rollout

# The built-in models whose step carries a key-value cache.
CACHED = ["hwm-transformer", "awm-transformer"]


def plain_scan(model, s1, actions):
    """The reference: `step` scanned, differentiated by JAX alone (the route of a
    carry without a cache)."""
    step = lambda carry, action: model.step(carry, action)  # noqa: E731
    return jax.lax.scan(step, model.init(s1, actions.shape[0]), actions)[1]


def test_a_transformer_cache_is_an_abstract_cache():
    """The rollout recognises a cache by its type, not by its backbone."""
    env = diffenvs.make("double_pendulum", horizon=5)
    model = worldmodels.make("hwm-transformer", env, key=jr.key(0))
    carry = model.init(env.initial_state(), 5)
    leaves = jax.tree.leaves(
        carry, is_leaf=lambda x: isinstance(x, worldmodels.AbstractCache)
    )
    assert any(isinstance(x, worldmodels.AbstractCache) for x in leaves)


def lively(model):
    """`model` with its backbone's weights scaled up: attention far from uniform
    and the steps strongly coupled, so that a step reading a wrong row of the
    cache, or a lost tangent, shows in the result."""
    scale = lambda x: 5 * x if eqx.is_inexact_array(x) else x  # noqa: E731
    return eqx.tree_at(lambda m: m.backbone, model, jax.tree.map(scale, model.backbone))


def in_segments(segment: int):
    """The rollout with the shortest segment `segment`."""
    return lambda m, s, a: rollout(m, s, a, segment=segment)


# A rollout through a cache runs in segments of growing buffers, by default only
# from H = 256 on: at H = 40 `worldmodels.unroll` runs one segment, and a shortest
# segment of 13 gives three of unequal lengths (13, 13, 14).
SEGMENTED = {"one-segment": worldmodels.unroll, "3-segments": in_segments(13)}


@pytest.mark.parametrize("segments", SEGMENTED)
@pytest.mark.parametrize("name", CACHED)
def test_derivatives_equal_plain_scan(x64, segments, name):
    run = SEGMENTED[segments]
    env = make_float64("double_pendulum", horizon=40)
    model = lively(worldmodels.make(name, env, key=jr.key(0)))
    s1 = env.initial_state()
    actions = jr.uniform(jr.key(1), (40, env.action_dim), minval=-1, maxval=1)
    weights = jr.normal(jr.key(2), (40, env.state_dim))

    def loss(run):
        return lambda args: jnp.sum(jnp.sin(run(*args)) * weights)

    got = eqx.filter_jit(run)(model, s1, actions)
    want = eqx.filter_jit(plain_scan)(model, s1, actions)
    assert_close(got, want, rtol=1e-12)

    args = (model, s1, actions)
    got = eqx.filter_jit(eqx.filter_grad(loss(run)))(args)
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
    assert_close(forward(run), forward(plain_scan), rtol=1e-10)


HWM_ROLLOUTS = {
    "predict": lambda m, s, a: m.predict(s, a),
    "3-segments": in_segments(6),
}


@pytest.mark.parametrize("segments", HWM_ROLLOUTS)
def test_hwm_second_order_derivative_equals_plain_scan(x64, segments):
    """An HWM's `predict` is its rollout, through the cache with a transformer: a
    Hessian-vector product through it (one segment at H = 20) and through the
    rollout in three segments equals the plain scan's."""
    env = make_float64("double_pendulum", horizon=20)
    model = lively(worldmodels.make("hwm-transformer", env, key=jr.key(0)))
    s1 = env.initial_state()
    actions = jr.uniform(jr.key(1), (20, env.action_dim), minval=-1, maxval=1)
    direction = jr.normal(jr.key(2), actions.shape)

    def hessian_vector(run):
        grad = jax.grad(lambda a: jnp.sum(jnp.sin(run(model, s1, a))))
        return jax.jit(lambda a, d: jax.jvp(grad, (a,), (d,))[1])(actions, direction)

    got = hessian_vector(HWM_ROLLOUTS[segments])
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

    growths = {"plain": growth(plain_scan), "cached": growth(in_segments(16))}
    assert growths["plain"] > 3.5, growths
    assert growths["cached"] < 2.5, growths
