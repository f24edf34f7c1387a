"""The transformer backbone's two forms: the blocked causal attention of the
parallel pass (with its hand-written backward pass) against the reference
attention and against the key-value cache of the step-by-step pass, both plain
masked attention under automatic differentiation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import assert_close

import worldmodels


@pytest.mark.parametrize("length", [1, 7, 64, 150])
def test_parallel_equals_cache_values_and_gradients(x64, length):
    """150 steps are two full blocks of 64 queries and a short one of 22."""
    _check_parallel_against_cache(length)


def test_long_sequence_has_longer_blocks(x64):
    """Past `max_blocks` blocks of 64 the blocks grow instead: here 150 steps in
    two blocks of 75."""
    attention = worldmodels.BlockedAttention(max_blocks=2)
    assert attention.query_blocks(150) == [(0, 75), (75, 150)]
    _check_parallel_against_cache(150, attention)


def test_blocked_attention_rejects_bad_settings():
    with pytest.raises(ValueError, match="block"):
        worldmodels.BlockedAttention(block=0)


@pytest.mark.parametrize("length", [1, 70, 150])
def test_blocked_equals_reference_under_vmap(x64, length):
    """Values and gradients of the blocked kernel against the plain masked softmax,
    under `jax.vmap`. At batch 10 the default chunks hold five examples of 70 steps
    (and fewer of 150), so the batch runs as a loop over chunks; 70 and 150 steps
    end in a short block."""
    heads, width, batch = 3, 12, 10
    qkv = jr.normal(jr.key(0), (batch, length, 3 * width))
    cotangent = jr.normal(jr.key(1), (batch, length, width))

    def loss(attention):
        return lambda x: jnp.sum(jax.vmap(lambda r: attention(r, heads))(x) * cotangent)

    blocked = worldmodels.BlockedAttention()
    reference = worldmodels.ReferenceAttention()
    got = jax.jit(jax.vmap(lambda r: blocked(r, heads)))(qkv)
    want = jax.jit(jax.vmap(lambda r: reference(r, heads)))(qkv)
    # float64: the two sum in different orders, a few ulp per operation.
    assert_close(got, want, rtol=1e-12)
    grad = jax.jit(jax.grad(loss(blocked)))(qkv)
    assert_close(grad, jax.jit(jax.grad(loss(reference)))(qkv), rtol=1e-10)


def test_reference_attention_transformer_predicts_the_same(x64):
    """The attention strategy changes how, not what: a transformer built with
    `ReferenceAttention` has the default's weights and outputs."""
    make = lambda **kw: worldmodels.Transformer(100, width=12, key=jr.key(0), **kw)  # noqa: E731
    default, reference = make(), make(attention=worldmodels.ReferenceAttention())
    inputs = jr.normal(jr.key(1), (100, 12))
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(reference), strict=True):
        assert np.array_equal(a, b)
    # float64: the two sum in different orders, a few ulp per operation.
    run = eqx.filter_jit(lambda m, x: m(x))
    assert_close(run(default, inputs), run(reference, inputs), rtol=1e-12)


def _check_parallel_against_cache(length: int, attention=None) -> None:
    attention = attention or worldmodels.BlockedAttention()
    key, inputs_key, cotangent_key = jr.split(jr.key(0), 3)
    transformer = worldmodels.Transformer(
        150, width=12, num_heads=3, attention=attention, key=key
    )
    inputs = jr.normal(inputs_key, (length, 12))
    cotangent = jr.normal(cotangent_key, (length, 12))

    def by_cache(transformer, inputs):
        carry = transformer.init(length)
        step = lambda carry, x: transformer.step(carry, x)  # noqa: E731
        return jax.lax.scan(step, carry, inputs)[1]

    def loss(run):
        return lambda both: jnp.sum(run(*both) * cotangent)

    parallel = eqx.filter_jit(lambda m, x: m(x))(transformer, inputs)
    cached = eqx.filter_jit(by_cache)(transformer, inputs)
    # float64: the two routes sum in different orders, a few ulp per operation.
    assert_close(parallel, cached, rtol=1e-12)

    grads = eqx.filter_jit(eqx.filter_grad(loss(lambda m, x: m(x))))
    expected = eqx.filter_jit(eqx.filter_grad(loss(by_cache)))
    for got, want in zip(
        jax.tree.leaves(grads((transformer, inputs))),
        jax.tree.leaves(expected((transformer, inputs))),
        strict=True,
    ):
        assert_close(got, want, rtol=1e-10)


def test_causal_attention_gradient_is_causal(x64):
    """A later input has no effect, not even through the hand-written backward
    pass: the gradient of output t with respect to input s > t is exactly zero."""
    transformer = worldmodels.Transformer(150, width=12, num_heads=3, key=jr.key(0))
    inputs = jr.normal(jr.key(1), (150, 12))
    t = 70  # in the second block of queries
    grad = jax.jit(jax.grad(lambda x: jnp.sum(transformer(x)[t])))(inputs)
    assert np.all(np.asarray(grad[t + 1 :]) == 0.0)
    assert np.all(np.any(np.asarray(grad[: t + 1]) != 0.0, axis=1))


@pytest.mark.parametrize("batch", [6, 5])
def test_batch_in_chunks_equals_one_example_at_a_time(x64, batch):
    """Under `jax.vmap` the attention runs a few examples at a time. With room
    for two examples per chunk, a batch of 6 is three chunks of 2 and a batch of
    5 five chunks of 1; values and gradients match a loop over the examples."""
    length, heads, width = 70, 3, 12
    row = heads * 64 * length * 8  # the largest block's float64 weights, one example
    transformer = worldmodels.Transformer(
        length,
        width=width,
        num_heads=heads,
        attention=worldmodels.BlockedAttention(chunk_bytes=2 * row),
        key=jr.key(0),
    )
    inputs = jr.normal(jr.key(1), (batch, length, width))
    cotangent = jr.normal(jr.key(2), (batch, length, width))

    def loss(transformer, inputs):
        return jnp.sum(jax.vmap(transformer)(inputs) * cotangent)

    # The per-example references are compiled once and called per example.
    batched = eqx.filter_jit(jax.vmap(lambda x: transformer(x)))(inputs)
    single = eqx.filter_jit(lambda m, x: m(x))
    one_by_one = jnp.stack([single(transformer, x) for x in inputs])
    assert_close(batched, one_by_one, rtol=1e-12)

    got = eqx.filter_jit(eqx.filter_grad(loss))(transformer, inputs)
    single_grad = eqx.filter_jit(eqx.filter_grad(lambda m, x, c: jnp.sum(m(x) * c)))
    want = jax.tree.map(
        lambda *leaves: sum(leaves),
        *(
            single_grad(transformer, x, c)
            for x, c in zip(inputs, cotangent, strict=True)
        ),
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w, rtol=1e-10)
    input_grad = eqx.filter_jit(jax.grad(loss, argnums=1))(transformer, inputs)
    one_example = eqx.filter_jit(jax.grad(lambda m, x, c: jnp.sum(m(x) * c), argnums=1))
    for x, c, g in zip(inputs, cotangent, input_grad, strict=True):
        assert_close(g, one_example(transformer, x, c), rtol=1e-10)
