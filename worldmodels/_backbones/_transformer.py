"""A causal GPT-2-style transformer with a key-value cache for generation."""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

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
    into the layer's weight and bias. Applied to the rows, the scale is a
    (time, width) broadcast that XLA on CPU writes out in full before the product
    (an extra kernel and 2.3 MB of scratch memory per layer norm at batch 16,
    H = 500, forward and backward); folded, it scales the small weight."""
    assert norm.weight is not None and norm.bias is not None
    assert layer.bias is not None
    bias = layer.weight @ norm.bias + layer.bias
    return affine(_standardise(norm, x), layer.weight * norm.weight, bias)


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


# Queries per block of the blocked causal attention below, and the most blocks it
# writes out (a longer sequence gets longer blocks, so compile time stays bounded).
_BLOCK = 64
_MAX_BLOCKS = 16


def _query_blocks(time: int) -> list[tuple[int, int]]:
    """`(start, stop)` of each block of queries; block `[start, stop)` attends to
    the first `stop` keys only."""
    block = max(_BLOCK, -(-time // _MAX_BLOCKS))
    return [(start, min(start + block, time)) for start in range(0, time, block)]


def _block_scores(q: Array, scaled_k: Array, start: int, stop: int) -> Array:
    """The scores of queries `[start, stop)` against keys `[0, stop)` (already
    scaled by 1/sqrt(head)), with the keys a query cannot see (key > query) at
    -inf."""
    scores = jnp.einsum("hqd,hkd->hqk", q[:, start:stop], scaled_k[:, :stop])
    # The mask as an added constant rather than a select: XLA on CPU then fuses the
    # product, the mask, the row maximum and the exponentials into one kernel,
    # where a select splits them and writes the scores out once more. The scale is
    # on the keys, not here: a constant factor on the scores is written out at
    # their full size for that kernel, which made the forward pass alone ~15%
    # slower.
    hidden = np.arange(stop)[None, :] > np.arange(start, stop)[:, None]
    return scores + np.where(hidden, -np.inf, 0.0).astype(scores.dtype)


def _split_heads(rows: Float[Array, "time columns"], num_heads: int, parts: int):
    """Rows `(time, parts * width)`, `parts` arrays `(time, width)` side by side,
    as `(parts, heads, time, head)`."""
    time = rows.shape[0]
    return rows.reshape(time, parts, num_heads, -1).transpose(1, 2, 0, 3)


def _merge_heads(x: Float[Array, "heads time head"]) -> Float[Array, "time width"]:
    heads, time, head = x.shape
    return x.transpose(1, 0, 2).reshape(time, heads * head)


# The most bytes of one block's (heads, queries, keys) weights that a batch
# processes at once; see `_in_chunks`.
_CHUNK_BYTES = 2**20


def _in_chunks(fn, num_heads: int):
    """`fn` as it is, but under `jax.vmap` run on a few examples at a time.

    Attention writes (heads, queries, keys) matrices for every block of queries.
    Over a whole batch they outgrow the CPU's caches: at 500 steps one block of
    a batch of 16 is 6 MB, and per example the attention ran about twice as
    slowly at batch 16 as at batch 2. So a batch is cut into chunks small enough
    that a block's matrices stay in cache (`_CHUNK_BYTES`), processed one after
    another in a loop. Example `i` of a batch goes to chunk `i % count`, so a
    batch split over devices along its leading axis leaves every chunk split the
    same way; each chunk is read from the batch and written back in place, with
    no copy of the whole batch into the order of the chunks.
    """
    chunked = jax.custom_batching.custom_vmap(fn)

    @chunked.def_vmap
    def rule(size, in_batched, *args):
        args = jax.tree.map(
            lambda x, batched: x if batched else jnp.broadcast_to(x, (size, *x.shape)),
            args,
            tuple(in_batched),
        )
        # The first argument is the rows of the sequence: (size, time, columns).
        first = jax.tree.leaves(args)[0]
        time = first.shape[1]
        block = max(end - start for start, end in _query_blocks(time))
        most = max(1, _CHUNK_BYTES // (num_heads * block * time * first.dtype.itemsize))
        # The largest chunk that divides the batch, so that every chunk is alike.
        chunk = max(n for n in range(1, min(most, size) + 1) if size % n == 0)
        count = size // chunk
        if count == 1:
            out = jax.vmap(fn)(*args)
        else:
            # (size, ...) -> (chunk, count, ...): example i at [i // count, i % count].
            args = jax.tree.map(lambda x: x.reshape(chunk, count, *x.shape[1:]), args)

            def take(i):
                return jax.tree.map(
                    lambda x: jax.lax.dynamic_index_in_dim(x, i, 1, keepdims=False),
                    args,
                )

            shapes = jax.eval_shape(lambda a: jax.vmap(fn)(*a), take(0))
            empty = jax.tree.map(
                lambda y: jnp.zeros((chunk, count, *y.shape[1:]), y.dtype), shapes
            )

            def body(i, out):
                pieces = jax.vmap(fn)(*take(i))
                return jax.tree.map(
                    lambda o, y: jax.lax.dynamic_update_index_in_dim(o, y, i, 1),
                    out,
                    pieces,
                )

            out = jax.lax.fori_loop(0, count, body, empty)
            out = jax.tree.map(lambda y: y.reshape(size, *y.shape[2:]), out)
        return out, jax.tree.map(lambda _: True, out)

    return chunked


@functools.cache
def _causal_attention(num_heads: int):
    """Causal multi-head attention on rows `(time, 3 * width)` of queries, keys and
    values, returning rows `(time, width)`: computed one block of queries at a
    time, each block against only the keys it can see, with a hand-written
    backward pass.

    The same arithmetic as `_attention` with a lower-triangular mask. Blocks keep
    the scores in cache, and a block of queries skips the keys it cannot see,
    about 43% of the square at 500 steps: that made the model's forward and
    backward pass about 1.5 times faster on CPU than the same blocks over all the
    keys (benchmarks/README.md). The blocks are a Python loop, so that each has its
    own static shape. Reverse mode only: `jax.jvp` through it raises.

    The forward pass keeps only the row sums of each block's weights; the
    backward pass computes the weights again, block by block, and folds their
    normalisation into its small (query, head) operands. So the residuals are the
    size of the inputs, not of the (heads, time, time) square, and under
    `jax.vmap` both passes work on a few examples at a time (`_in_chunks`). Both
    passes take and give rows, as the layers around them do, and split the heads
    apart inside, one chunk at a time, where the chunk is in cache.
    """

    @functools.partial(_in_chunks, num_heads=num_heads)
    def forward(qkv):
        q, k, v = _split_heads(qkv, num_heads, 3)
        scaled_k = k * (1.0 / math.sqrt(q.shape[-1]))
        outs, totals = [], []
        for start, stop in _query_blocks(q.shape[1]):
            exp = _block_weights(q, scaled_k, start, stop)
            total = jnp.sum(exp, axis=-1, keepdims=True)
            outs.append(jnp.einsum("hqk,hkd->hqd", exp, v[:, :stop]) / total)
            totals.append(total)
        out = _merge_heads(jnp.concatenate(outs, axis=1))
        return out, jnp.concatenate(totals, axis=1)

    @functools.partial(_in_chunks, num_heads=num_heads)
    def backward(qkv, out, total, out_grad):
        q, k, v = _split_heads(qkv, num_heads, 3)
        head = q.shape[-1]
        scaled_k = k * (1.0 / math.sqrt(head))
        out = _split_heads(out, num_heads, 1)[0]
        out_grad = _split_heads(out_grad, num_heads, 1)[0]
        # With weights P = E / total: dS = P * (dP - rowsum(dO * O)), dP = dO V^T
        # and dV = P^T dO. The 1 / total goes on the (query, head) and (query, 1)
        # operands, so the (query, key) matrices are E itself. E is computed again
        # exactly as the forward pass did, maximum included, so it matches `total`.
        row_dot = jnp.sum(out_grad * out, axis=-1, keepdims=True)
        inverse = 1.0 / total
        normalised_grad = out_grad * inverse
        heads, keys, _ = v.shape
        k_grad = v_grad = jnp.zeros((heads, head, keys), v.dtype)
        q_grads = []
        for start, stop in _query_blocks(q.shape[1]):
            exp = _block_weights(q, scaled_k, start, stop)
            weights_grad = jnp.einsum(
                "hqd,hkd->hqk", out_grad[:, start:stop], v[:, :stop]
            )
            scores_grad = exp * (
                (weights_grad - row_dot[:, start:stop]) * inverse[:, start:stop]
            )
            q_grads.append(jnp.einsum("hqk,hkd->hqd", scores_grad, scaled_k[:, :stop]))
            # The key and value gradients contract the (block, keys) matrices over
            # the block, their leading axis. Written as (keys, head) products, XLA
            # on CPU ran them about three times slower per FLOP than the other
            # products here. As (head, keys) products, with the small (block,
            # head) operands on the left, they run at the speed of the others; the
            # gradients are accumulated transposed and turned once at the end.
            v_grad = v_grad.at[:, :, :stop].add(
                jnp.einsum("hqd,hqk->hdk", normalised_grad[:, start:stop], exp)
            )
            k_grad = k_grad.at[:, :, :stop].add(
                jnp.einsum("hqd,hqk->hdk", q[:, start:stop], scores_grad)
            )
        q_grad = jnp.concatenate(q_grads, axis=1)
        # That was the gradient of scaled_k; times d scaled_k / dk for k's.
        k_grad = k_grad * (1.0 / math.sqrt(head))
        return jnp.concatenate(
            [
                _merge_heads(q_grad),
                _merge_heads(jnp.swapaxes(k_grad, 1, 2)),
                _merge_heads(jnp.swapaxes(v_grad, 1, 2)),
            ],
            axis=1,
        )

    @jax.custom_vjp
    def attention(qkv):
        return forward(qkv)[0]

    def attention_forward(qkv):
        out, total = forward(qkv)
        return out, (qkv, out, total)

    def attention_backward(residuals, out_grad):
        return (backward(*residuals, out_grad),)

    attention.defvjp(attention_forward, attention_backward)
    return attention


def _block_weights(q: Array, scaled_k: Array, start: int, stop: int) -> Array:
    """The unnormalised weights exp(scores - row maximum) of queries
    `[start, stop)`; XLA on CPU computes them in one kernel with the product."""
    scores = _block_scores(q, scaled_k, start, stop)
    return jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))


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

    def _qkv(self, x: Float[Array, "time width"]) -> Float[Array, "time columns"]:
        return _normed_dense(self.attention_norm, self.qkv, x)

    def _heads(self, x: Float[Array, "time width"]):
        return _split_heads(self._qkv(x), self.num_heads, 3)

    def _finish(self, x: Array, attended: Array) -> Array:
        x = x + dense(self.projection, attended)
        hidden = jax.nn.gelu(_normed_dense(self.mlp_norm, self.hidden, x))
        return x + dense(self.output, hidden)

    def __call__(self, x: Float[Array, "time width"]) -> Float[Array, "time width"]:
        return self._finish(x, _causal_attention(self.num_heads)(self._qkv(x)))

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
        return self._finish(x, _merge_heads(attended)), keys, values


class KeyValueCache(eqx.Module):
    """The key-value cache: every layer's keys and values of the steps so far,
    in buffers of the sequence's full length, and the next position.

    A step writes row `position` of every buffer and reads rows 0 ... `position`
    only, so it computes the same from any later state of the buffers; the
    rollouts of `worldmodels._rollout` rely on this.
    """

    keys: tuple[Float[Array, "heads horizon head"], ...] | None
    values: tuple[Float[Array, "heads horizon head"], ...] | None
    position: Int[Array, ""]

    def without_buffers(self) -> KeyValueCache:
        return KeyValueCache(None, None, self.position)

    def with_buffers(self, other: KeyValueCache) -> KeyValueCache:
        return KeyValueCache(other.keys, other.values, self.position)

    def resized(self, length: int) -> KeyValueCache:
        """The cache with buffers of `length` rows: the first `length` rows of
        these, or these followed by rows of zeros. A step reads its buffers' whole
        length (rows after `position` masked), so shorter buffers make early steps
        cheaper; the caller keeps `position < length`."""
        assert self.keys is not None and self.values is not None

        def resize(buffer: Array) -> Array:
            extra = length - buffer.shape[1]
            if extra <= 0:
                return buffer[:, :length]
            return jnp.pad(buffer, ((0, 0), (0, extra), (0, 0)))

        keys = tuple(map(resize, self.keys))
        return KeyValueCache(keys, tuple(map(resize, self.values)), self.position)


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
