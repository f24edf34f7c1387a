"""A causal GPT-2-style transformer with a key-value cache for generation."""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._backbone import AbstractBackbone, check_positive, dense


def _layer_norm(norm: eqx.nn.LayerNorm, x: Float[Array, "time width"]) -> Array:
    # `eqx.nn.LayerNorm` normalises one row; this normalises every row at once.
    assert norm.weight is not None and norm.bias is not None
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + norm.eps) * norm.weight + norm.bias


def _attention(
    q: Float[Array, "heads query head"],
    k: Float[Array, "heads key head"],
    v: Float[Array, "heads key head"],
    visible: Bool[Array, "query key"],
) -> Float[Array, "heads query head"]:
    """Multi-head scaled dot-product attention, each query attending to the keys
    that are `visible` to it."""
    # Heads lead every operand, so both products are plain batched matrix products
    # and the key-value cache is never transposed.
    scores = jnp.einsum("hqd,hkd->hqk", q, k) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("hqk,hkd->hqd", weights, v)


# Queries per block of the blocked causal attention below.
_BLOCK = 64


def _blocks(x: Array, block: int) -> Array:
    """(heads, time, d) -> (blocks, heads, block, d), zero-padded at the end."""
    count = -(-x.shape[1] // block)
    x = jnp.pad(x, ((0, 0), (0, count * block - x.shape[1]), (0, 0)))
    return x.reshape(x.shape[0], count, block, x.shape[2]).transpose(1, 0, 2, 3)


def _unblock(x: Array, time: int) -> Array:
    count, heads, block, d = x.shape
    return x.transpose(1, 0, 2, 3).reshape(heads, count * block, d)[:, :time]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_attention(q: Array, k: Array, v: Array, block: int) -> Array:
    """Causal attention computed one block of queries at a time, with a backward
    pass that recomputes each block's weights instead of storing the whole
    (heads, time, time) matrix.

    The same arithmetic as `_attention` with a lower-triangular mask. Working on one
    block at a time keeps the scores in cache: at 500 steps and batch 16 this
    halved the time of attention's forward and backward pass on CPU
    (benchmarks/test_models.py). Reverse mode only: `jax.jvp` through it raises.
    """
    return _causal_attention_forward(q, k, v, block)[0]


def _visible(start: Array, block: int, keys: int) -> Array:
    return jnp.arange(keys)[None, :] <= (start + jnp.arange(block))[:, None]


def _causal_attention_forward(q, k, v, block):
    time = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    starts = jnp.arange(0, -(-time // block) * block, block)

    def one_block(inputs):
        q_block, start = inputs
        scores = jnp.einsum("hqd,hkd->hqk", q_block, k) * scale
        scores = jnp.where(_visible(start, block, k.shape[1]), scores, -jnp.inf)
        peak = jnp.max(scores, axis=-1, keepdims=True)
        exp = jnp.exp(scores - peak)
        total = jnp.sum(exp, axis=-1, keepdims=True)
        out = jnp.einsum("hqk,hkd->hqd", exp, v) / total
        return out, (peak + jnp.log(total))[..., 0]

    out, log_total = jax.lax.map(one_block, (_blocks(q, block), starts))
    out = _unblock(out, time)
    return out, (q, k, v, out, log_total)


def _causal_attention_backward(block, residuals, out_grad):
    q, k, v, out, log_total = residuals
    time = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    starts = jnp.arange(0, -(-time // block) * block, block)
    # d softmax: dS = P * (dP - rowsum(dO * O)).
    row_dot = jnp.sum(out_grad * out, axis=-1, keepdims=True)

    def one_block(carry, inputs):
        k_grad, v_grad = carry
        q_block, grad_block, dot_block, log_block, start = inputs
        scores = jnp.einsum("hqd,hkd->hqk", q_block, k) * scale
        weights = jnp.where(
            _visible(start, block, k.shape[1]),
            jnp.exp(scores - log_block[..., None]),
            0.0,
        )
        weights_grad = jnp.einsum("hqd,hkd->hqk", grad_block, v)
        scores_grad = weights * (weights_grad - dot_block) * scale
        q_grad = jnp.einsum("hqk,hkd->hqd", scores_grad, k)
        # The key and value gradients contract the (block, keys) matrices over the
        # block, their leading axis. Written as (keys, head) products, XLA on CPU
        # ran them about three times slower per FLOP than the other products here
        # (a quarter of the whole backward pass). As (head, keys) products, with the
        # small (block, head) operands on the left, they run at the speed of the
        # others; the gradients are accumulated transposed and turned once at the
        # end. The backward pass got about 25% faster (benchmarks/test_models.py).
        v_grad = v_grad + jnp.einsum("hqd,hqk->hdk", grad_block, weights)
        k_grad = k_grad + jnp.einsum("hqd,hqk->hdk", q_block, scores_grad)
        return (k_grad, v_grad), q_grad

    inputs = (
        _blocks(q, block),
        _blocks(out_grad, block),
        _blocks(row_dot, block),
        log_total,
        starts,
    )
    heads, keys, head = k.shape
    zeros = jnp.zeros((heads, head, keys), k.dtype)
    (k_grad, v_grad), q_grad = jax.lax.scan(one_block, (zeros, zeros), inputs)
    k_grad, v_grad = jnp.swapaxes(k_grad, 1, 2), jnp.swapaxes(v_grad, 1, 2)
    return _unblock(q_grad, time), k_grad, v_grad


_causal_attention.defvjp(_causal_attention_forward, _causal_attention_backward)


class _Block(eqx.Module):
    """Pre-norm block: x + attention(norm(x)), then x + MLP(norm(x))."""

    attention_norm: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    projection: eqx.nn.Linear
    mlp_norm: eqx.nn.LayerNorm
    hidden: eqx.nn.Linear
    output: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, width: int, num_heads: int, mlp_width: int, depth: int, *, key):
        qkv_key, projection_key, hidden_key, output_key = jr.split(key, 4)
        self.attention_norm = eqx.nn.LayerNorm(width)
        self.qkv = _gpt2_linear(width, 3 * width, 0.02, qkv_key)
        # GPT-2 shrinks the layers that write into the residual stream, so that
        # its variance does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * depth)
        self.projection = _gpt2_linear(width, width, residual_std, projection_key)
        self.mlp_norm = eqx.nn.LayerNorm(width)
        self.hidden = _gpt2_linear(width, mlp_width, 0.02, hidden_key)
        self.output = _gpt2_linear(mlp_width, width, residual_std, output_key)
        self.num_heads = num_heads

    def _heads(self, x: Float[Array, "time width"]):
        time, width = x.shape
        qkv = dense(self.qkv, _layer_norm(self.attention_norm, x))
        qkv = qkv.reshape(time, 3, self.num_heads, width // self.num_heads)
        qkv = qkv.transpose(1, 2, 0, 3)  # (3, heads, time, head)
        return qkv[0], qkv[1], qkv[2]

    def _finish(self, x: Array, attended: Array) -> Array:
        attended = attended.transpose(1, 0, 2).reshape(x.shape)
        x = x + dense(self.projection, attended)
        hidden = jax.nn.gelu(dense(self.hidden, _layer_norm(self.mlp_norm, x)))
        return x + dense(self.output, hidden)

    def __call__(self, x: Float[Array, "time width"]) -> Float[Array, "time width"]:
        q, k, v = self._heads(x)
        block = min(_BLOCK, x.shape[0])
        return self._finish(x, _causal_attention(q, k, v, block))

    def step(
        self,
        x: Float[Array, "1 width"],
        keys: Float[Array, "heads horizon head"],
        values: Float[Array, "heads horizon head"],
        position: Int[Array, ""],
        visible: Bool[Array, " horizon"],
    ):
        q, k, v = self._heads(x)
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k, position, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(values, v, position, axis=1)
        attended = _attention(q, keys, values, visible[None, :])
        return self._finish(x, attended), keys, values


class _Cache(eqx.Module):
    """The key-value cache: every layer's keys and values of the steps so far,
    in buffers of the sequence's full length, and the next position."""

    keys: tuple[Float[Array, "heads horizon head"], ...]
    values: tuple[Float[Array, "heads horizon head"], ...]
    position: Int[Array, ""]


class Transformer(AbstractBackbone):
    """A causal transformer in the style of GPT-2 (arXiv App. C: 2 layers, 3 heads,
    width 72, MLP 64): learned positional embeddings, pre-norm blocks of causal
    multi-head self-attention and a GELU MLP, a final layer norm.

    The parallel form computes all heads of a layer with one matrix product per
    projection over the whole sequence. `step` keeps a key-value cache, so a step
    costs one query against the cached keys: generation never recomputes the
    prefix.

    Args:
        max_length: the longest sequence it accepts (one positional embedding per
            position).
        width: embedding width; a multiple of `num_heads`.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_width: hidden width of each block's MLP.
        key: PRNG key for the initial weights.
    """

    positions: Float[Array, "max_length width"]
    blocks: tuple[_Block, ...]
    final_norm: eqx.nn.LayerNorm
    max_length: int = eqx.field(static=True)
    in_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)

    def __init__(
        self,
        max_length: int,
        width: int = 72,
        depth: int = 2,
        num_heads: int = 3,
        mlp_width: int = 64,
        *,
        key: PRNGKeyArray,
    ):
        check_positive(
            max_length=max_length,
            width=width,
            depth=depth,
            num_heads=num_heads,
            mlp_width=mlp_width,
        )
        if width % num_heads:
            raise ValueError(
                f"width must be a multiple of num_heads, got width={width} and "
                f"num_heads={num_heads}."
            )
        position_key, *block_keys = jr.split(key, depth + 1)
        self.positions = 0.01 * jr.normal(position_key, (max_length, width))
        self.blocks = tuple(
            _Block(width, num_heads, mlp_width, depth, key=k) for k in block_keys
        )
        self.final_norm = eqx.nn.LayerNorm(width)
        self.max_length = max_length
        self.in_size = width
        self.out_size = width

    def __call__(
        self, inputs: Float[Array, "time width"]
    ) -> Float[Array, "time width"]:
        time = inputs.shape[0]
        if time > self.max_length:
            raise ValueError(
                f"the sequence has {time} steps but the transformer was built for "
                f"max_length={self.max_length}."
            )
        x = inputs + self.positions[:time]
        for block in self.blocks:
            x = block(x)
        return _layer_norm(self.final_norm, x)

    def init(self, horizon: int) -> _Cache:
        if horizon > self.max_length:
            raise ValueError(
                f"horizon={horizon} exceeds the transformer's max_length="
                f"{self.max_length}."
            )
        block = self.blocks[0]
        heads = block.num_heads
        shape = (heads, horizon, self.in_size // heads)
        empty = tuple(jnp.zeros(shape, self.positions.dtype) for _ in self.blocks)
        return _Cache(empty, empty, jnp.zeros((), jnp.int32))

    def step(self, carry: _Cache, x: Float[Array, " width"]):
        position = carry.position
        x = (x + self.positions[position])[None]
        visible = jnp.arange(carry.keys[0].shape[1]) <= position
        keys, values = [], []
        for block, k, v in zip(self.blocks, carry.keys, carry.values, strict=True):
            x, k, v = block.step(x, k, v, position, visible)
            keys.append(k)
            values.append(v)
        out = _layer_norm(self.final_norm, x)[0]
        return _Cache(tuple(keys), tuple(values), position + 1), out


def _gpt2_linear(
    in_size: int, out_size: int, std: float, key: PRNGKeyArray
) -> eqx.nn.Linear:
    """A linear layer with GPT-2's initialisation: N(0, std²) weights, zero bias."""
    layer = eqx.nn.Linear(in_size, out_size, key=key)
    weight = std * jr.normal(key, (out_size, in_size))
    layer = eqx.tree_at(lambda lin: lin.weight, layer, weight)
    return eqx.tree_at(lambda lin: lin.bias, layer, jnp.zeros(out_size))
