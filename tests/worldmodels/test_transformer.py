"""The transformer backbone's two forms: the blocked causal attention of the
parallel pass (with its hand-written backward pass) against the key-value cache
of the step-by-step pass, which uses plain masked attention and automatic
differentiation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import assert_close

import worldmodels
from worldmodels._backbones import _transformer


@pytest.mark.parametrize("length", [1, 7, 64, 150])
def test_parallel_equals_cache_values_and_gradients(x64, length):
    """150 steps are two full blocks of 64 queries and a short one of 22."""
    _check_parallel_against_cache(length)


def test_long_sequence_has_longer_blocks(x64, monkeypatch):
    """Past `_MAX_BLOCKS` blocks of 64 the blocks grow instead: here 150 steps in
    two blocks of 75."""
    monkeypatch.setattr(_transformer, "_MAX_BLOCKS", 2)
    assert _transformer._query_blocks(150) == [(0, 75), (75, 150)]
    _check_parallel_against_cache(150)


def _check_parallel_against_cache(length: int) -> None:
    key, inputs_key, cotangent_key = jr.split(jr.key(0), 3)
    transformer = worldmodels.Transformer(150, width=12, num_heads=3, key=key)
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
def test_batch_in_chunks_equals_one_example_at_a_time(x64, monkeypatch, batch):
    """Under `jax.vmap` the attention runs a few examples at a time. With room
    for two examples per chunk, a batch of 6 is three chunks of 2 and a batch of
    5 five chunks of 1; values and gradients match a loop over the examples."""
    length, heads, width = 70, 3, 12
    row = heads * 64 * length * 8  # the largest block's float64 weights, one example
    monkeypatch.setattr(_transformer, "_CHUNK_BYTES", 2 * row)
    transformer = worldmodels.Transformer(
        length, width=width, num_heads=heads, key=jr.key(0)
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
