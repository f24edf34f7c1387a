"""A causal GPT-2-style transformer with a key-value cache for generation."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._rollout import AbstractCache
from ._attention import (
    AbstractAttention,
    BlockedAttention,
    masked_attention,
    merge_heads,
    split_heads,
)
from ._backbone import AbstractBackbone, affine, check_positive, dense


def _standardise(norm: eqx.nn.LayerNorm, x: Float[Array, "time width"]) -> Array:
    """Every row of `x` to mean 0 and variance 1: `norm` without its scale and
    shift."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + norm.eps)


def _layer_norm(norm: eqx.nn.LayerNorm, x: Float[Array, "time width"]) -> Array:
    # `eqx.nn.LayerNorm` normalises one row; this normalises every row at once.
    assert norm.weight is not None and norm.bias is not None
    return _standardise(norm, x) * norm.weight + norm.bias


def _normed_dense(
    norm: eqx.nn.LayerNorm, layer: eqx.nn.Linear, x: Float[Array, "time width"]
) -> Array:
    """`dense(layer, _layer_norm(norm, x))`, with the norm's scale and shift folded
    into the layer's weight and bias: the scale then multiplies the small weight,
    not a (time, width) broadcast that XLA on CPU would write out in full."""
    assert norm.weight is not None and norm.bias is not None
    assert layer.bias is not None
    bias = layer.weight @ norm.bias + layer.bias
    return affine(_standardise(norm, x), layer.weight * norm.weight, bias)


class _Block(eqx.Module):
    """Pre-norm GPT-2 block: x + attention(norm(x)), then x + MLP(norm(x))."""

    attention_norm: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    attention: AbstractAttention
    projection: eqx.nn.Linear
    mlp_norm: eqx.nn.LayerNorm
    hidden: eqx.nn.Linear
    output: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_width: int,
        depth: int,
        attention: AbstractAttention,
        *,
        key,
    ):
        qkv_key, projection_key, hidden_key, output_key = jr.split(key, 4)
        self.attention_norm = eqx.nn.LayerNorm(width)
        self.qkv = _gpt2_linear(width, 3 * width, 0.02, qkv_key)
        self.attention = attention
        # GPT-2 shrinks the layers that write into the residual stream, so that
        # its variance does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * depth)
        self.projection = _gpt2_linear(width, width, residual_std, projection_key)
        self.mlp_norm = eqx.nn.LayerNorm(width)
        self.hidden = _gpt2_linear(width, mlp_width, 0.02, hidden_key)
        self.output = _gpt2_linear(mlp_width, width, residual_std, output_key)
        self.num_heads = num_heads

    def __call__(self, x: Float[Array, "time width"]) -> Float[Array, "time width"]:
        qkv = _normed_dense(self.attention_norm, self.qkv, x)
        x = x + dense(self.projection, self.attention(qkv, self.num_heads))
        return x + self._mlp(x)

    def _mlp(self, x: Float[Array, "time width"]) -> Float[Array, "time width"]:
        hidden = jax.nn.gelu(_normed_dense(self.mlp_norm, self.hidden, x))
        return dense(self.output, hidden)

    def step(
        self,
        x: Float[Array, "1 width"],
        keys: Float[Array, "heads horizon head"],
        values: Float[Array, "heads horizon head"],
        position: Int[Array, ""],
        visible: Bool[Array, " horizon"],
    ):
        """The block on one row, its key and value written into the cache's
        buffers at `position` and its query attending to the `visible` rows."""
        qkv = _normed_dense(self.attention_norm, self.qkv, x)
        q, k, v = split_heads(qkv, self.num_heads, 3)
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k, position, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(values, v, position, axis=1)
        attended = merge_heads(masked_attention(q, keys, values, visible[None, :]))
        x = x + dense(self.projection, attended)
        return x + self._mlp(x), keys, values


class KeyValueCache(AbstractCache):
    """The key-value cache: every layer's keys and values of the steps so far,
    in buffers of the sequence's full length, and the next position.

    A step writes row `position` of every buffer and reads rows 0 ... `position`
    only (the contract of `AbstractCache`).
    """

    keys: tuple[Float[Array, "heads horizon head"], ...] | None
    values: tuple[Float[Array, "heads horizon head"], ...] | None
    position: Int[Array, ""]

    def without_buffers(self) -> KeyValueCache:
        return KeyValueCache(None, None, self.position)

    def with_buffers(self, other: KeyValueCache) -> KeyValueCache:
        return KeyValueCache(other.keys, other.values, self.position)

    def resized(self, length: int) -> KeyValueCache:
        # A step reads its buffers' whole length (rows after `position` masked),
        # so shorter buffers make early steps cheaper.
        assert self.keys is not None and self.values is not None

        def resize(buffer: Array) -> Array:
            extra = length - buffer.shape[1]
            if extra <= 0:
                return buffer[:, :length]
            return jnp.pad(buffer, ((0, 0), (0, extra), (0, 0)))

        keys = tuple(map(resize, self.keys))
        return KeyValueCache(keys, tuple(map(resize, self.values)), self.position)


# The default attention (immutable, so one instance serves every transformer).
_BLOCKED = BlockedAttention()


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
        attention: how the parallel form computes causal self-attention
            (`BlockedAttention()`, or `ReferenceAttention()` to check it); the
            step-by-step form always attends to its cache directly.
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
        attention: AbstractAttention = _BLOCKED,
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
            _Block(width, num_heads, mlp_width, depth, attention, key=k)
            for k in block_keys
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

    def init(self, horizon: int) -> KeyValueCache:
        if horizon > self.max_length:
            raise ValueError(
                f"horizon={horizon} exceeds the transformer's max_length="
                f"{self.max_length}."
            )
        block = self.blocks[0]
        heads = block.num_heads
        shape = (heads, horizon, self.in_size // heads)
        empty = tuple(jnp.zeros(shape, self.positions.dtype) for _ in self.blocks)
        return KeyValueCache(empty, empty, jnp.zeros((), jnp.int32))

    def step(self, carry: KeyValueCache, x: Float[Array, " width"]):
        assert carry.keys is not None and carry.values is not None
        position = carry.position
        x = (x + self.positions[position])[None]
        visible = jnp.arange(carry.keys[0].shape[1]) <= position
        keys, values = [], []
        for block, k, v in zip(self.blocks, carry.keys, carry.values, strict=True):
            x, k, v = block.step(x, k, v, position, visible)
            keys.append(k)
            values.append(v)
        out = _layer_norm(self.final_norm, x)[0]
        return KeyValueCache(tuple(keys), tuple(values), position + 1), out


def _gpt2_linear(
    in_size: int, out_size: int, std: float, key: PRNGKeyArray
) -> eqx.nn.Linear:
    """A linear layer with GPT-2's initialisation: N(0, std²) weights, zero bias."""
    layer = eqx.nn.Linear(in_size, out_size, key=key)
    weight = std * jr.normal(key, (out_size, in_size))
    layer = eqx.tree_at(lambda lin: lin.weight, layer, weight)
    return eqx.tree_at(lambda lin: lin.bias, layer, jnp.zeros(out_size))
