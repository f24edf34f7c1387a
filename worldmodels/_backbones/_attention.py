"""Causal multi-head self-attention of a whole sequence, as strategy objects.

`ReferenceAttention` is the textbook masked softmax, differentiated by JAX.
`BlockedAttention`, the transformer's default, computes the same one block of
queries at a time against only the keys each block can see, with a hand-written
backward pass whose residuals are the size of its inputs, and under `jax.vmap` runs
a few examples at a time.
"""

from __future__ import annotations

import abc
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float


class AbstractAttention(eqx.Module):
    """Causal multi-head self-attention: row t of the output attends to rows
    0 ... t of the input only."""

    @abc.abstractmethod
    def __call__(
        self, qkv: Float[Array, "time columns"], num_heads: int
    ) -> Float[Array, "time width"]:
        """The attended values of one sequence.

        Args:
            qkv: rows of queries, keys and values side by side, `(time, 3 * width)`,
                each of them `num_heads` heads side by side.
            num_heads: the number of heads; divides `width`.

        Returns:
            Rows `(time, width)`, the heads side by side. Single example; use
            `jax.vmap`.
        """


class ReferenceAttention(AbstractAttention):
    """Scaled dot-product attention over the whole lower-triangular masked square,
    differentiated by JAX: obviously correct, and the check on the others."""

    def __call__(
        self, qkv: Float[Array, "time columns"], num_heads: int
    ) -> Float[Array, "time width"]:
        q, k, v = split_heads(qkv, num_heads, 3)
        time = qkv.shape[0]
        visible = np.arange(time)[None, :] <= np.arange(time)[:, None]
        return merge_heads(masked_attention(q, k, v, visible))


class BlockedAttention(AbstractAttention):
    """The same arithmetic as `ReferenceAttention`, one block of queries at a time,
    each block against only the keys it can see, with a hand-written backward
    pass. Reverse mode only: `jax.jvp` through it raises.

    Blocks keep the scores in cache, and a block of queries skips the keys it
    cannot see (close to half the square on a long sequence). The blocks are a
    Python loop, so that each has its own static shape; past `max_blocks` blocks
    of `block` queries the blocks grow instead, so compile time stays bounded.

    The forward pass keeps only the row sums of each block's weights; the
    backward pass computes the weights again, block by block, and folds their
    normalisation into its small (query, head) operands. So the residuals are the
    size of the inputs, not of the (heads, time, time) square. Both passes take and
    give rows, as the layers around them do, and split the heads apart inside, one
    chunk of a batch at a time, where the chunk is in cache.

    Under `jax.vmap` a batch is cut into chunks whose (heads, queries, keys) weights
    of one block take at most `chunk_bytes`, processed one after another: over a
    whole batch those matrices outgrow the CPU's caches, and the attention then runs
    several times slower per example.

    Args:
        block: queries per block.
        max_blocks: the most blocks; a longer sequence gets longer blocks.
        chunk_bytes: the most bytes of one block's weights that a batch processes at
            once.
    """

    block: int = eqx.field(default=64, static=True, kw_only=True)
    max_blocks: int = eqx.field(default=16, static=True, kw_only=True)
    chunk_bytes: int = eqx.field(default=2**20, static=True, kw_only=True)

    def __check_init__(self):
        for name in ("block", "max_blocks", "chunk_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    def query_blocks(self, time: int) -> list[tuple[int, int]]:
        """`(start, stop)` of each block of queries of a sequence of `time` steps;
        block `[start, stop)` attends to the first `stop` keys only."""
        return _query_blocks(time, self.block, self.max_blocks)

    def __call__(
        self, qkv: Float[Array, "time columns"], num_heads: int
    ) -> Float[Array, "time width"]:
        attention = _blocked_attention(
            num_heads, self.block, self.max_blocks, self.chunk_bytes
        )
        return attention(qkv)


def masked_attention(
    q: Float[Array, "heads query head"],
    k: Float[Array, "heads key head"],
    v: Float[Array, "heads key head"],
    visible: Bool[Array, "query key"],
) -> Float[Array, "heads query head"]:
    """Multi-head scaled dot-product attention, each query attending to the keys
    that are `visible` to it."""
    # Heads lead every operand, so both products are plain batched matrix products
    # and a key-value cache is never transposed.
    scores = jnp.einsum("hqd,hkd->hqk", q, k) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("hqk,hkd->hqd", weights, v)


def split_heads(rows: Float[Array, "time columns"], num_heads: int, parts: int):
    """Rows `(time, parts * width)`, `parts` arrays `(time, width)` side by side,
    as `(parts, heads, time, head)`."""
    time = rows.shape[0]
    return rows.reshape(time, parts, num_heads, -1).transpose(1, 2, 0, 3)


def merge_heads(x: Float[Array, "heads time head"]) -> Float[Array, "time width"]:
    heads, time, head = x.shape
    return x.transpose(1, 0, 2).reshape(time, heads * head)


def _query_blocks(time: int, block: int, max_blocks: int) -> list[tuple[int, int]]:
    block = max(block, -(-time // max_blocks))
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
    # their full size for that kernel.
    hidden = np.arange(stop)[None, :] > np.arange(start, stop)[:, None]
    return scores + np.where(hidden, -np.inf, 0.0).astype(scores.dtype)


def _block_weights(q: Array, scaled_k: Array, start: int, stop: int) -> Array:
    """The unnormalised weights exp(scores - row maximum) of queries
    `[start, stop)`; XLA on CPU computes them in one kernel with the product."""
    scores = _block_scores(q, scaled_k, start, stop)
    return jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))


def _in_chunks(fn, num_heads: int, blocks, chunk_bytes: int):
    """`fn` as it is, but under `jax.vmap` run on a few examples at a time.

    A batch is cut into chunks small enough that a block's (heads, queries, keys)
    matrices stay in cache (`chunk_bytes`), processed one after another in a loop.
    Example `i` of a batch goes to chunk `i % count`, so a batch split over devices
    along its leading axis leaves every chunk split the same way; each chunk is
    read from the batch and written back in place, with no copy of the whole batch
    into the order of the chunks. `blocks(time)` gives the blocks of queries.
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
        block = max(end - start for start, end in blocks(time))
        most = max(1, chunk_bytes // (num_heads * block * time * first.dtype.itemsize))
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


# Cached on the static values, so that every block and every call with the same
# settings shares one function (and JAX's caches keyed on it).
@functools.cache
def _blocked_attention(num_heads: int, block: int, max_blocks: int, chunk_bytes: int):
    """`BlockedAttention(...)(qkv, num_heads)` as a function of `qkv`."""
    blocks = functools.partial(_query_blocks, block=block, max_blocks=max_blocks)
    in_chunks = functools.partial(
        _in_chunks, num_heads=num_heads, blocks=blocks, chunk_bytes=chunk_bytes
    )

    @in_chunks
    def forward(qkv):
        q, k, v = split_heads(qkv, num_heads, 3)
        scaled_k = k * (1.0 / math.sqrt(q.shape[-1]))
        outs, totals = [], []
        for start, stop in blocks(q.shape[1]):
            exp = _block_weights(q, scaled_k, start, stop)
            total = jnp.sum(exp, axis=-1, keepdims=True)
            outs.append(jnp.einsum("hqk,hkd->hqd", exp, v[:, :stop]) / total)
            totals.append(total)
        out = merge_heads(jnp.concatenate(outs, axis=1))
        return out, jnp.concatenate(totals, axis=1)

    @in_chunks
    def backward(qkv, out, total, out_grad):
        q, k, v = split_heads(qkv, num_heads, 3)
        head = q.shape[-1]
        scaled_k = k * (1.0 / math.sqrt(head))
        out = split_heads(out, num_heads, 1)[0]
        out_grad = split_heads(out_grad, num_heads, 1)[0]
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
        for start, stop in blocks(q.shape[1]):
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
            # on CPU runs them far slower per FLOP than the other products here. As
            # (head, keys) products, with the small (block, head) operands on the
            # left, they run at the speed of the others; the gradients are
            # accumulated transposed and turned once at the end.
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
                merge_heads(q_grad),
                merge_heads(jnp.swapaxes(k_grad, 1, 2)),
                merge_heads(jnp.swapaxes(v_grad, 1, 2)),
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
