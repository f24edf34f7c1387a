"""Tools shared by the tests of the gradient bounds of Ma et al. (2024), arXiv
2402.05290, Appendix A (see `docs/theory.md`).

Index convention. Every model here follows the world-model protocol of the
package: `predict(s1, actions)` maps the initial state and H actions to the H
predicted states. In the paper's 1-based notation row `j` of the states is
ŝ_{j+2} and row `i` of the actions is a_{i+1}, so the number of recurrent steps
between them, t - k - 1 in the paper, is `j - i` here.

Imported by the test modules of this folder as `theory.common` (the `tests`
folder is on the Python path, see `pyproject.toml`).
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from hypothesis import HealthCheck, settings
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

import diffenvs
import worldmodels

# The `x64` fixture is a context that must hold for every example of a property,
# which is what a function-scoped fixture shared by the examples gives.
x64_settings = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

# Relative slack for an inequality between two float64 quantities computed along
# different routes (a Jacobian by automatic differentiation against a product of
# norms). Each is exact up to a few ulp per operation (1e-16) over at most a few
# hundred operations, so 1e-9 is far above rounding and far below any real
# violation (the counterexamples in this folder exceed their bounds by factors).
BOUND_RTOL = 1e-9

Predict = Callable[[Array, Array], Array]


def block_norms(jacobian: Float[Array, "h n h m"]) -> np.ndarray:
    """The spectral norms of the blocks d states[j] / d actions[i].

    Args:
        jacobian: the Jacobian of `predict` with respect to the actions, shape
            `(horizon, state, horizon, action)`.

    Returns:
        A `(horizon, horizon)` array whose entry `[j, i]` is the spectral norm.
    """
    blocks = np.asarray(jacobian).transpose(0, 2, 1, 3)
    return np.linalg.norm(blocks, ord=2, axis=(-2, -1))


def spectral_norm(matrix: Array) -> float:
    """The largest singular value of a matrix (a 1-D array is a column)."""
    matrix = np.asarray(matrix)
    return float(np.linalg.norm(matrix.reshape(matrix.shape[0], -1), ord=2))


def lag_matrix(horizon: int) -> np.ndarray:
    """Entry `[j, i]` is the lag `j - i`, clipped below at 0."""
    index = np.arange(horizon)
    return np.maximum(index[:, None] - index[None, :], 0)


def assert_at_most(actual, bound, *, rtol: float = BOUND_RTOL, err_msg: str = ""):
    """actual <= bound (1 + rtol) elementwise, with `tiny` so that 0 <= 0."""
    actual, bound = np.broadcast_arrays(np.asarray(actual), np.asarray(bound))
    excess = actual - bound * (1.0 + rtol) - np.finfo(np.float64).tiny
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
    assert np.all(excess <= 0.0), (
        f"{err_msg} bound exceeded at {worst}: {actual[worst]!r} > {bound[worst]!r}"
    )


def random_matrix(rng: np.random.Generator, rows: int, cols: int, scale: float):
    """A Gaussian matrix with entries N(0, scale^2 / cols), as float64."""
    return jnp.asarray(rng.normal(0.0, scale / np.sqrt(cols), (rows, cols)))


def r_squared(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The coefficient of determination and slope of the least-squares line."""
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    return 1.0 - np.sum(residual**2) / np.sum((y - y.mean()) ** 2), float(slope)


class TinyPolicy(eqx.Module):
    """A deterministic MLP policy, a = tanh(W2 tanh(W1 s + b1) + b2), the
    paper's π_θ. Single example; use `jax.vmap`."""

    w1: Array
    b1: Array
    w2: Array
    b2: Array

    @classmethod
    def init(cls, key: PRNGKeyArray, state_dim: int, action_dim: int, width: int):
        k1, k2, k3, k4 = jr.split(key, 4)
        return cls(
            jr.normal(k1, (width, state_dim)) / np.sqrt(state_dim),
            0.1 * jr.normal(k2, (width,)),
            jr.normal(k3, (action_dim, width)) / np.sqrt(width),
            0.1 * jr.normal(k4, (action_dim,)),
        )

    def __call__(self, state: Array) -> Array:
        return jnp.tanh(self.w2 @ jnp.tanh(self.w1 @ state + self.b1) + self.b2)


def generate(predict: Predict, policy, s1: Array, horizon: int, action_dim: int):
    """Run the policy in closed loop through a causal model, without gradient, by
    the package's one closed-loop generation (`diffenvs.closed_loop`) through the
    predict-only incremental interface.

    Step k reads ŝ_k (s1 at k = 0, else row k - 1 of `predict` on the actions
    chosen so far) and appends a_k = π(ŝ_k).

    Returns:
        The states the policy saw, ŝ_1 ... ŝ_H, shape `(horizon, state)`.
    """
    model = worldmodels.PredictOnly(_Predictor(predict), action_dim)
    trajectory = diffenvs.closed_loop(
        model, lambda seen, key: policy(seen[:-1]), s1, jr.key(0), horizon
    )
    return jax.lax.stop_gradient(trajectory.observations[:, :-1])


class _Predictor(eqx.Module):
    predict: Callable


def bpo_objective(
    policy, predict: Predict, reward: Callable[[Array], Scalar], seen: Array, s1
) -> Scalar:
    """J(θ) = Σ_t r(ŝ_t) with a_k = π_θ(sg[ŝ_k]) (eq. 1-2 of the paper).

    The stop-gradient makes the gradient that of one parallel call of `predict`
    on the re-evaluated actions (the package's design, METHOD §4).
    """
    actions = jax.vmap(policy)(jax.lax.stop_gradient(seen))
    return jnp.sum(jax.vmap(reward)(predict(s1, actions)))


def policy_lipschitz(policy, seen: Array) -> float:
    """L_π measured on the trajectory: max_k ‖∂π_θ(ŝ_k)/∂θ‖ (spectral norm)."""
    flat, unravel = ravel_pytree(policy)

    def action(params, state):
        return unravel(params)(state)

    jacobians = jax.vmap(jax.jacfwd(action), in_axes=(None, 0))(flat, seen)
    return float(np.max(np.linalg.norm(np.asarray(jacobians), ord=2, axis=(-2, -1))))


def gradient_norm(tree) -> float:
    """The Euclidean norm of a pytree of arrays (a gradient)."""
    flat, _ = ravel_pytree(tree)
    return float(np.linalg.norm(np.asarray(flat)))


def closed_loop_gradient(model, policy, s1, goal, horizon: int):
    """BPO on the reward -|ŝ - goal|²/2: the states the policy saw in a closed-loop
    generation, the gradient with respect to the policy, the re-evaluated actions
    and the states `predict` gives for them."""
    seen = generate(model.predict, policy, s1, horizon, policy.b2.shape[0])

    def reward(state):
        return -0.5 * jnp.sum((state - goal) ** 2)

    grad = eqx.filter_grad(bpo_objective)(policy, model.predict, reward, seen, s1)
    actions = jax.vmap(policy)(seen)
    return grad, seen, actions, model.predict(s1, actions)
