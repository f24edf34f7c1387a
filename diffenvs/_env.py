"""The task interface shared by every environment of `diffenvs`."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree, Scalar

from ._checks import all_finite, as_horizon, check_horizon, check_shape, promote
from ._closed_loop import Dynamics, closed_loop, observation
from ._constants import check_constants
from ._errors import branched_error_if, check_key
from ._hashing import tree_hash
from ._ode import check_solver, ode_step
from ._references import References, normalized_score, references


class EnvState(eqx.Module):
    """The state of the functional step interface.

    Attributes:
        state: the physical state x_k, shape `(state_dim,)`.
        step: the step counter k, a scalar integer in `[0, horizon]`.
    """

    state: Float[Array, " state"]
    step: Int[Array, ""]


class Rollout(eqx.Module):
    """One closed-loop episode, as returned by `AbstractEnv.rollout`.

    Row k of every field belongs to step k: `observations[k]` is what the policy saw,
    `actions[k]` what it did (clipped to `[-1, 1]`), `states[k]` the state x_{k+1}
    that followed, `rewards[k]` the reward r_k.
    """

    observations: Float[Array, "horizon obs"]
    actions: Float[Array, "horizon action"]
    states: Float[Array, "horizon state"]
    rewards: Float[Array, " horizon"]


class AbstractEnv(eqx.Module):
    """A deterministic finite-horizon control task, differentiable end to end.

    A task fixes the initial state s1 = x_0, a transition x_{k+1} = F(k, x_k, a_k)
    and a reward r_k for k = 0 ... H-1. Actions live in `[-1, 1]^action_dim`;
    anything outside is clipped (so its gradient is zero there).

    Every method handles a single example; batch with `jax.vmap`. None of them is
    jitted: wrap the calling function in `jax.jit` or `eqx.filter_jit`.
    `jax.jit(env.step)` works too: a task hashes by value (its type, its static
    fields and the bytes of its constants), so jit caches on it and bakes the
    constants into the program; a task with other constants compiles anew.

    The two fields below are shared by every task, so they live here rather than
    being repeated in each concrete class.
    """

    horizon: int = eqx.field(static=True, converter=as_horizon)
    solver: diffrax.AbstractSolver = eqx.field(default_factory=diffrax.Euler)

    name: ClassVar[str]
    state_dim: ClassVar[int]
    action_dim: ClassVar[int]
    # True where a state that became NaN or infinite stays non-finite to the end of
    # the episode, so that checking the final state is enough and the time loop
    # carries no flag. False, checking every step, unless a family of tasks knows
    # better (`AbstractControlTask`).
    _nonfinite_persists: ClassVar[bool] = False

    def __check_init__(self):
        check_horizon(self.horizon)
        check_solver(self.solver)
        check_constants(self)

    def __hash__(self) -> int:
        # By value, consistent with `==`, so that `jax.jit(env.step)` can cache on
        # the bound method.
        return tree_hash(self)

    # ---- what a task defines ---------------------------------------------------

    @property
    @abc.abstractmethod
    def dt(self) -> float:
        """The length of one control step."""

    @abc.abstractmethod
    def initial_state(self) -> Float[Array, " state"]:
        """The fixed initial state s1 = x_0, shape `(state_dim,)`."""

    @abc.abstractmethod
    def transition_and_reward(
        self, step: Int[Array, ""], state: Float[Array, " state"], action: Array
    ) -> tuple[Float[Array, " state"], Scalar]:
        """One step k from x_k under `action` (in `[-1, 1]`): the next state x_{k+1}
        and the reward of the step except its terminal part (`terminal_reward`).
        Both in one method, so that a task shares the work between them (the
        control computed from the action)."""

    @abc.abstractmethod
    def terminal_reward(self, final_state: Float[Array, " state"]) -> Scalar:
        """The extra reward of the last step, a function of the final state x_H
        (zero for a task without one)."""

    @abc.abstractmethod
    def reference_actions(self) -> Float[Array, "horizon action"] | None:
        """A known good open-loop action sequence, used as one start of the
        trajectory optimiser behind `references()`; `None` if there is none."""

    def transition(
        self, step: Int[Array, ""], state: Float[Array, " state"], action: Array
    ) -> Float[Array, " state"]:
        """The state x_{k+1} after taking `action` (in `[-1, 1]`) in x_k at step k:
        the first output of `transition_and_reward` (under `jax.jit` the reward is
        not computed)."""
        return self.transition_and_reward(step, state, action)[0]

    def running_reward(
        self, step: Int[Array, ""], state: Float[Array, " state"], action: Array
    ) -> Scalar:
        """The reward of step k, except the terminal part: the second output of
        `transition_and_reward`."""
        return self.transition_and_reward(step, state, action)[1]

    def ode_step(
        self,
        vector_field: Callable[..., Array],
        t0: Float[Array, ""],
        y0: Float[Array, " state"],
        args: Array,
    ) -> Float[Array, " state"]:
        """One step of length `dt` of the ODE `dy/dt = vector_field(t, y, args)`
        with this task's Diffrax solver, the control held constant in `args`: one
        solver step rather than `diffrax.diffeqsolve`, since the control changes at
        every step and each step is its own initial-value problem."""
        return ode_step(self.solver, vector_field, t0, t0 + self.dt, y0, args)

    # ---- the step body -----------------------------------------------------------

    def _step(
        self,
        step: Int[Array, ""],
        state: Array,
        action: Array,
        finite: Array | bool = True,
    ) -> tuple[Array, Scalar, Array | bool]:
        """One step as every path runs it: the time loop of `predict` and `rewards`
        (`_simulate`), `step`, and `rollout` (through `Dynamics`).

        Returns x_{k+1}, r_k except its terminal part, and whether every state so
        far is finite: `finite` and x_{k+1}'s own finiteness, tracked here where the
        state is at hand rather than in a second pass over the trajectory. Where a
        non-finite state persists, `finite` is returned unchanged and
        `_finite_through` settles it from the last state.
        """
        next_state, reward = self.transition_and_reward(step, state, action)
        if not self._nonfinite_persists:
            finite = finite & all_finite(next_state)
        return next_state, reward, finite

    def _finite_through(self, last_state: Array, finite: Array | bool) -> Array:
        """Whether every state up to `last_state` is finite, given the flag that
        `_step` carried to it."""
        if self._nonfinite_persists:
            return all_finite(last_state)
        return jnp.asarray(finite)

    # ---- the world-model protocol ------------------------------------------------

    def predict(
        self, s1: Float[Array, " state"], actions: Float[Array, "horizon action"]
    ) -> Float[Array, "horizon state"]:
        """The states x_1 ... x_H reached from `s1` under `actions`.

        This is the world-model protocol: row k is the state after action k.
        Single example; use `jax.vmap`.

        Args:
            s1: initial state, shape `(state_dim,)`.
            actions: shape `(horizon, action_dim)`, clipped to `[-1, 1]`.

        Returns:
            The states, shape `(horizon, state_dim)`.
        """
        states, _, _, check = self._simulate(s1, actions)
        return check(states)

    def _simulate(
        self, s1: Array, actions: Array
    ) -> tuple[Array, Array, Array, Callable[[Array], Array]]:
        """One time loop: the states, the final state, the running rewards, and the
        check to apply to whatever is returned (a NaN action or a diverged state
        raises). Unused outputs cost nothing: JAX drops them from the loop."""
        s1, actions = self._check_shapes(s1, actions)

        def body(carry, inputs):
            state, finite = carry
            step, action = inputs
            next_state, reward, finite = self._step(step, state, action, finite)
            return (next_state, finite), (next_state, reward)

        steps = jnp.arange(self.horizon)
        init = (s1, jnp.array(True))
        (last, finite), (states, rewards) = jax.lax.scan(body, init, (steps, actions))
        finite = self._finite_through(last, finite)
        nan_action = jnp.any(jnp.isnan(actions))
        bad_s1 = ~all_finite(s1)
        return (
            states, last, rewards,
            lambda out: self._report(out, nan_action, finite, bad_s1),
        )  # fmt: skip

    def rewards_from_states(
        self,
        s1: Float[Array, " state"],
        actions: Float[Array, "horizon action"],
        states: Float[Array, "horizon state"],
    ) -> Float[Array, " horizon"]:
        """The rewards r_0 ... r_{H-1} of a trajectory whose states are given (by
        `predict`, or by a world model). Computed in parallel over time."""
        s1, actions = self._check_shapes(s1, actions)
        states = jnp.asarray(states)
        check_shape(
            states,
            (self.horizon, self.state_dim),
            "states must have shape (horizon, state_dim)",
            self.name,
            "; batch with jax.vmap",
        )
        previous = jnp.concatenate([s1[None], states[:-1]])
        steps = jnp.arange(self.horizon)
        rewards = jax.vmap(self.running_reward)(steps, previous, actions)
        return rewards.at[-1].add(self.terminal_reward(states[-1]))

    def rewards(
        self, s1: Float[Array, " state"], actions: Float[Array, "horizon action"]
    ) -> Float[Array, " horizon"]:
        """The rewards r_0 ... r_{H-1} from `s1` under `actions`, shape `(horizon,)`.
        Single example; use `jax.vmap`.

        Computed in the same time loop as the states: one sequential pass, as one
        would write it by hand. (`rewards_from_states` computes them in parallel from
        given states.)"""
        _, last, rewards, check = self._simulate(s1, actions)
        return check(rewards.at[-1].add(self.terminal_reward(last)))

    def episode_return(self, actions: Float[Array, "horizon action"]) -> Scalar:
        """The undiscounted return of `actions` from `initial_state()`."""
        return jnp.sum(self.rewards(self.initial_state(), actions))

    # ---- the functional step interface ------------------------------------------

    def reset(self, key: PRNGKeyArray | None = None) -> EnvState:
        """The initial `EnvState`. The tasks are deterministic: `key` is accepted for
        the usual `reset(key)` signature and ignored."""
        del key
        return EnvState(self.initial_state(), jnp.zeros((), jnp.int32))

    def step(
        self, env_state: EnvState, action: Float[Array, " action"]
    ) -> tuple[EnvState, Scalar, jax.Array]:
        """One step: returns the next `EnvState`, the reward r_k and `done`.

        Pure and differentiable; there is no automatic reset. Stepping an episode
        that is already done is an error (raised under `jit` as well).
        """
        k = env_state.step
        action = self._check_action(action, finished=k >= self.horizon)
        next_state, reward, finite = self._step(k, env_state.state, action)
        done = k + 1 >= self.horizon
        reward = reward + jnp.where(done, self.terminal_reward(next_state), 0.0)
        next_state, reward = self._report(
            (next_state, reward), jnp.array(False),
            self._finite_through(next_state, finite), ~all_finite(env_state.state),
        )  # fmt: skip
        return EnvState(next_state, k + 1), reward, done

    def observe(self, env_state: EnvState) -> Float[Array, " obs"]:
        """The policy's observation: the state with the normalised time k/H appended,
        shape `(state_dim + 1,)`."""
        return observation(env_state.state, env_state.step, self.horizon)

    def rollout(
        self,
        policy: Callable[[Float[Array, " obs"], PRNGKeyArray], Array],
        key: PRNGKeyArray,
    ) -> Rollout:
        """A closed-loop episode of `policy` from `initial_state()`.

        Generated by `diffenvs.closed_loop` through the task's `Dynamics`; the
        rewards are then computed from the states (`rewards_from_states`).

        Args:
            policy: called as `policy(observation, key)` at every step with a fresh
                key, returns an action of shape `(action_dim,)`. A deterministic
                policy ignores its key.
            key: a JAX PRNG key.

        Returns:
            A `Rollout` of observations, actions, next states and rewards.
        """

        check_key(key)

        def clipped(seen, step_key):
            action = jnp.clip(policy(seen, step_key), -1.0, 1.0)
            if action.shape != (self.action_dim,):
                raise ValueError(
                    f"policy must return an action of shape (action_dim,) = "
                    f"({self.action_dim},) for task {self.name!r}, got {action.shape}."
                )
            return action

        s1 = self.initial_state()
        trajectory = closed_loop(Dynamics(self), clipped, s1, key, self.horizon)
        actions, states = trajectory.actions, trajectory.states
        rewards = self.rewards_from_states(s1, actions, states)
        nan_action = jnp.any(jnp.isnan(actions))
        states, rewards = self._report(
            (states, rewards), nan_action, all_finite(states)
        )
        return Rollout(trajectory.observations, actions, states, rewards)

    # ---- reference returns -------------------------------------------------------

    def references(self) -> References:
        """The random and optimal reference returns of this task at this horizon.

        Looked up in the table shipped with the package when the task has its
        default configuration, else computed (Monte-Carlo random baseline and
        multi-start trajectory optimisation) and cached on disk. Call it outside
        `jit`.
        """
        return references(self)

    def normalized_score(self, episode_return: ArrayLike) -> Array:
        """(R - R_rand) / (R_opt - R_rand): 0 is random, 1 is optimal."""
        return normalized_score(self, episode_return)

    # ---- checks ------------------------------------------------------------------

    def _check_action(self, action: Array, finished: Array) -> Array:
        action = jnp.asarray(action)
        check_shape(
            action,
            (self.action_dim,),
            "action must have shape (action_dim,)",
            self.name,
        )
        # On the action, which every output depends on, so that the checks also run
        # in the derivatives (`_errors`).
        action = branched_error_if(
            action,
            finished | jnp.any(jnp.isnan(action)),
            jnp.where(finished, 0, 1),
            (
                f"step called on a finished episode (step counter >= horizon="
                f"{self.horizon}); call reset first.",
                f"{self.name}: action contains NaN.",
            ),
        )
        return jnp.clip(action, -1.0, 1.0)

    def _check_shapes(self, s1: Array, actions: Array) -> tuple[Array, Array]:
        s1, actions = promote(s1), promote(actions)
        check_shape(s1, (self.state_dim,), "s1 must have shape (state_dim,)", self.name)
        check_shape(
            actions,
            (self.horizon, self.action_dim),
            "actions must have shape (horizon, action_dim)",
            self.name,
            "; batch with jax.vmap",
        )
        return s1, actions

    def _report(
        self,
        out: PyTree[Array],
        nan_action: Array,
        finite: Array,
        bad_state: Array | bool = False,
    ) -> Any:
        """`out`, with a check (under `jit` and in derivatives too) that raises if the
        given state was not finite, an action was NaN or a state became non-finite."""
        # Under vmap, Equinox reports the largest index raised anywhere in the batch,
        # so the more specific messages (bad input) get the larger indices.
        return branched_error_if(
            out,
            bad_state | nan_action | ~finite,
            jnp.where(bad_state, 2, jnp.where(nan_action, 1, 0)),
            (
                f"{self.name}: the integration diverged (a non-finite state) at "
                f"horizon={self.horizon}, dt={self.dt:.4g} with solver "
                f"{type(self.solver).__name__}; the step is too coarse for this "
                f"task: use a longer horizon or a more stable solver.",
                f"{self.name}: actions contain NaN.",
                f"{self.name}: the state given (s1, or the state of the EnvState) is "
                f"not finite.",
            ),
        )
