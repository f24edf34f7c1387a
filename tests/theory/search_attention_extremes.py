"""Offline search for near-extremal cases of the Cor. 2.2 row-sum bound.

The sharp bound (`docs/theory.md`, Corollary 2.2) is

    Σ_{k<t} ‖∂ŝ_t/∂a_k‖ ≤ ‖W_v‖ (1 + 2λ),   λ = α² ‖W_qᵀ W_k‖,

for the self-attention AWM of eq. 5 with ‖a_i‖ ≤ α. Random weights and actions
stay far below it once λ ≥ 1, so a test on random draws cannot tell the constant
2 from 1. This script maximises the ratio of the last row's sum to the bound by
gradient ascent (Adam, several restarts) over W_q, W_k, W_v and the actions, at
fixed shape and fixed λ: W_v is divided by its norm, W_q and W_k are rescaled so
that α² ‖W_qᵀ W_k‖ = λ, and each action is α u / max(1, ‖u‖).

Run it once, by hand, from the repository root:

    .venv/bin/python tests/theory/search_attention_extremes.py

It writes `tests/theory/attention_extremes.json`, which
`test_attention_awm.py` reads and pins as Hypothesis examples. Its cost (a few
minutes) is why it is not part of the test suite; the tests re-check each case
in milliseconds.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

jax.config.update("jax_enable_x64", True)

OUT = pathlib.Path(__file__).with_name("attention_extremes.json")
ALPHA = 1.0
# (horizon, state, action, key) of the property test in test_attention_awm.py,
# and λ values from the regime where random draws are furthest from the bound.
SHAPES = [(6, 1, 1, 1), (10, 2, 3, 2), (8, 3, 2, 4)]
LAMBDAS = [0.5, 2.0, 8.0, 32.0]
RESTARTS = 6
STEPS = 1500


def predict(w_q, w_k, w_v, actions):
    """Eq. 5, as `AttentionAWM.predict` in test_attention_awm.py."""
    logits = (actions @ w_q.T) @ (actions @ w_k.T).T
    causal = jnp.tril(jnp.ones(logits.shape, bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    return weights @ (actions @ w_v.T)


def constrain(params, lam):
    """Weights with ‖W_v‖ = 1 and α² ‖W_qᵀ W_k‖ = λ, actions in the α-ball."""
    w_q, w_k, w_v, u = params
    w_v = w_v / jnp.linalg.norm(w_v, ord=2)
    scale = jnp.sqrt(lam / (ALPHA**2 * jnp.linalg.norm(w_q.T @ w_k, ord=2)))
    norms = jnp.linalg.norm(u, axis=-1, keepdims=True)
    actions = ALPHA * u / jnp.maximum(1.0, norms)
    return scale * w_q, scale * w_k, w_v, actions


def last_row_sum(w_q, w_k, w_v, actions):
    """Σ_k ‖∂ŝ_T/∂a_k‖ for the last prediction (spectral norms of the blocks)."""
    jacobian = jax.jacrev(lambda a: predict(w_q, w_k, w_v, a)[-1])(actions)
    blocks = jnp.moveaxis(jacobian, 1, 0)  # (horizon, state, action)
    return jnp.sum(jnp.linalg.svd(blocks, compute_uv=False)[:, 0])


def search(shape, lam, key):
    horizon, state, action, key_dim = shape

    def objective(params):
        return -last_row_sum(*constrain(params, lam)) / (1.0 + 2.0 * lam)

    optimiser = optax.adam(3e-2)

    @jax.jit
    def step(params, opt_state):
        value, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    best = (np.inf, None)
    for restart in jr.split(key, RESTARTS):
        keys = jr.split(restart, 4)
        params = (
            jr.normal(keys[0], (key_dim, action)),
            jr.normal(keys[1], (key_dim, action)),
            jr.normal(keys[2], (state, action)),
            jr.normal(keys[3], (horizon, action)),
        )
        opt_state = optimiser.init(params)
        for _ in range(STEPS):
            params, opt_state, value = step(params, opt_state)
        value = float(objective(params))
        if value < best[0]:
            best = (value, params)
    return -best[0], constrain(best[1], lam)


def main():
    cases = []
    for index, shape in enumerate(SHAPES):
        for lam in LAMBDAS:
            ratio, (w_q, w_k, w_v, actions) = search(shape, lam, jr.key(index))
            print(f"shape {shape}, λ = {lam}: row sum / bound = {ratio:.4f}")
            cases.append(
                {
                    "shape": list(shape),
                    "lambda": lam,
                    "ratio": round(ratio, 6),
                    "w_q": np.asarray(w_q).tolist(),
                    "w_k": np.asarray(w_k).tolist(),
                    "w_v": np.asarray(w_v).tolist(),
                    "actions": np.asarray(actions).tolist(),
                }
            )
    OUT.write_text(json.dumps({"alpha": ALPHA, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
