"""The JAX the package runs on computes what the package relies on.

JAX 0.10.2 on CPU returns wrong reverse-mode Jacobians for a jitted, vmapped VJP
of a small causal-attention layer at 100 steps with 48 or more cotangents (a
quarter of their scale off), while eager execution, a jitted VJP per cotangent and
forward mode agree; 0.10.1 and 0.9.2 are right. `pyproject.toml` excludes that
release; this test fails on any JAX with the same miscompilation.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np


def _layer(x, w1, w2):
    mean = x.mean(-1, keepdims=True)
    h = (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    scores = jnp.where(jnp.tri(x.shape[0], dtype=bool), h @ h.T / 9.0, -jnp.inf)
    h = x + jax.nn.softmax(scores, -1) @ (h @ w1)
    return jax.nn.gelu(h) @ w2


def test_a_jitted_vmapped_vjp_equals_forward_mode():
    k1, k2, k3 = jr.split(jr.key(0), 3)
    w1, w2 = jr.normal(k1, (72, 72)) / 9, jr.normal(k2, (72, 2)) / 9
    x = jr.normal(k3, (100, 72))
    f = lambda x: _layer(x, w1, w2)  # noqa: E731
    out, vjp = jax.vjp(f, x)
    count = 64
    cotangents = jnp.eye(out.size)[:count].reshape(count, *out.shape)
    reverse = jax.jit(jax.vmap(vjp))(cotangents)[0]
    forward = jax.jacfwd(f)(x).reshape(out.size, *x.shape)[:count]
    scale = float(jnp.max(jnp.abs(forward)))
    np.testing.assert_allclose(reverse, forward, rtol=0, atol=1e-5 * scale)
