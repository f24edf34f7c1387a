"""Speed of agents.BPO, each case against a baseline measured in the same run.

* One policy update through the transformer actions world model (batch 16, H = 100
  and 500): generate-then-re-evaluate against a fully differentiable sequential
  unroll through the key-value cache, in time and in compiled scratch memory.
* Training throughput (environment steps per second, updates included) of the
  compiled chunks against the released code's loop structure: a Python loop making
  one jitted environment step per iteration and calling jitted updates at the same
  ratios; through the simulator and through the transformer, H = 100.
* 8 seeds vmapped in one program against 8 runs one after another.
* The compile time of one training chunk.

Results: `benchmarks/results/agents.json`, summarised at the end of the run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from _timing import format_time, machine, require_timing
from helpers import sequential_objective

import agents
import diffenvs
import worldmodels

TASK = "hiv"
BATCH = 16
TARGET_UPDATE_SPEEDUP = 5.0  # at H = 500
TARGET_SEED_SPEEDUP = 3.0
ROUNDS = 5


@pytest.fixture(scope="module")
def agents_results(write_results, summary) -> Iterator[dict[str, dict[str, Any]]]:
    results: dict[str, dict[str, Any]] = {
        "policy_update": {}, "throughput": {}, "seeds": {}, "compile": {},
    }  # fmt: skip
    yield results
    if not any(results.values()):
        return
    numbers = {"machine": machine(), **{k: v for k, v in results.items() if v}}
    write_results("agents", numbers)
    summary("agents speed (benchmarks/results/agents.json)", _lines(results))


def _interleave(candidate, baseline, rounds: int = ROUNDS):
    """Seconds per call of each, alternating which goes first, after one call of
    each (compilation)."""
    candidate()
    baseline()
    ours: list[float] = []
    theirs: list[float] = []
    for i in range(rounds):
        order = [(candidate, ours), (baseline, theirs)]
        for function, times in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return ours, theirs


def _speedup(ours: list[float], theirs: list[float]) -> dict[str, Any]:
    ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
    return {
        "ours_median_s": statistics.median(ours),
        "baseline_median_s": statistics.median(theirs),
        "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "rounds": len(ratios),
    }


# ---- one policy update --------------------------------------------------------


@pytest.mark.parametrize("horizon", [100, 500])
def test_policy_update_against_sequential_unroll(horizon, benchmark, agents_results):
    require_timing(benchmark)
    env = diffenvs.make(TASK, horizon=horizon)
    model = worldmodels.make("awm-transformer", env, key=jr.key(0))
    policy = agents.TanhGaussianPolicy(env.state_dim, env.action_dim, key=jr.key(1))
    params, static = eqx.partition(policy, eqx.is_inexact_array)
    s1 = jnp.broadcast_to(env.initial_state(), (BATCH, env.state_dim))
    keys = jr.split(jr.key(2), BATCH)
    alpha = 0.01

    def ours(p):
        value, _ = agents.batch_objective(
            eqx.combine(p, static), model, env, s1, keys, entropy_coefficient=alpha
        )
        return value

    def sequential(p):
        one = lambda s, k: sequential_objective(  # noqa: E731
            eqx.combine(p, static), model, env, s, k, alpha
        )
        return jnp.mean(jax.vmap(one)(s1, keys))

    compiled = {
        name: jax.jit(jax.value_and_grad(fn)).lower(params).compile()
        for name, fn in [("ours", ours), ("sequential", sequential)]
    }
    scratch = {
        name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()
    }
    (value, grad), (expected, expected_grad) = (
        compiled[name](params) for name in ("ours", "sequential")
    )
    np.testing.assert_allclose(value, expected, rtol=1e-4)
    for g, e in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad), strict=True):
        np.testing.assert_allclose(g, e, atol=1e-3 * float(jnp.max(jnp.abs(e))))

    ours_times, theirs = _interleave(
        lambda: jax.block_until_ready(compiled["ours"](params)),
        lambda: jax.block_until_ready(compiled["sequential"](params)),
    )
    case = {
        "horizon": horizon,
        "batch": BATCH,
        "model": "awm-transformer",
        "ours_scratch_bytes": scratch["ours"],
        "sequential_scratch_bytes": scratch["sequential"],
        "memory_ratio": scratch["sequential"] / max(scratch["ours"], 1),
        **_speedup(ours_times, theirs),
    }
    if horizon == 500:
        case["target_speedup"] = TARGET_UPDATE_SPEEDUP
        case["meets_target"] = case["speedup_median"] >= TARGET_UPDATE_SPEEDUP
    agents_results["policy_update"][f"H{horizon}"] = case


# ---- training throughput against the released code's loop ---------------------


class _HostLoop:
    """BPO as the released code runs it: a Python loop over environment steps, one
    jitted call per step, jitted model and policy updates at the agent's ratios.
    It starts from a `TrainState` (after warm-up) and uses the agent's pieces."""

    def __init__(self, bpo: agents.BPO, state: agents.TrainState):
        self.bpo, self.state = bpo, state
        env, hyper = bpo.env, state.hyper
        self.policy_opt = optax.chain(
            optax.clip_by_global_norm(hyper.max_grad_norm),
            optax.adam(hyper.policy_learning_rate),
        )
        self.model_opt = optax.chain(
            optax.clip_by_global_norm(hyper.max_grad_norm),
            optax.adam(hyper.model_learning_rate),
        )

        @eqx.filter_jit
        def act(policy, env_state, key):
            action = policy.act(env.observe(env_state), key)
            env_state, _, _ = env.step(env_state, action)
            return env_state, action

        @eqx.filter_jit
        def store(buffer, actions, states):
            return buffer.add(env.initial_state(), actions, states)

        @eqx.filter_jit
        def model_update(model, opt, buffer, key):
            batch = buffer.sample(key, bpo.model_batch)
            model, opt, _ = worldmodels.update(
                model, opt, batch, optimiser=self.model_opt
            )
            return model, opt

        @eqx.filter_jit
        def policy_update(policy, opt, model, buffer, key):
            through = env if model is None else model
            sample_key, noise_key = jr.split(key)
            s1 = buffer.sample(sample_key, bpo.policy_batch).s1
            noise = jr.split(noise_key, bpo.policy_batch)
            params, static = eqx.partition(policy, eqx.is_inexact_array)

            def objective(p):
                value, _ = agents.batch_objective(
                    eqx.combine(p, static), through, env, s1, noise,
                    entropy_coefficient=hyper.entropy_coefficient,
                )  # fmt: skip
                return value

            grads = jax.grad(objective)(params)
            updates, opt = self.policy_opt.update(
                jax.tree.map(jnp.negative, grads), opt, params
            )
            return eqx.apply_updates(policy, updates), opt

        self.act, self.store = act, store
        self.model_update, self.policy_update = model_update, policy_update

    def run(self, env_steps: int, key) -> None:
        bpo, state = self.bpo, self.state
        env = bpo.env
        policy, model = state.policy, state.model
        policy_opt, model_opt = state.policy_opt, state.model_opt
        buffer = state.buffer
        steps = 0
        while steps < env_steps:
            env_state = env.reset()
            actions, states = [], []
            for _ in range(env.horizon):
                key, step_key, model_key, policy_key = jr.split(key, 4)
                env_state, action = self.act(policy, env_state, step_key)
                actions.append(action)
                states.append(env_state.state)
                steps += 1
                if model is not None and steps % bpo.model_every == 0:
                    model, model_opt = self.model_update(
                        model, model_opt, buffer, model_key
                    )
                if steps % bpo.policy_every == 0:
                    policy, policy_opt = self.policy_update(
                        policy, policy_opt, model, buffer, policy_key
                    )
            buffer = self.store(buffer, jnp.stack(actions), jnp.stack(states))
        jax.block_until_ready((policy, model, buffer))


@pytest.mark.parametrize("model_name", ["simulator", "awm-transformer"])
def test_throughput_against_host_loop(model_name, benchmark, agents_results):
    require_timing(benchmark)
    horizon = 100
    env = diffenvs.make(TASK, horizon=horizon)
    model = None
    if model_name != "simulator":
        model = worldmodels.make(model_name, env, key=jr.key(0))
    # One chunk of 500 steps; warm-up (100 steps) ends inside the first chunk.
    bpo = agents.BPO(
        env, model, warmup_steps=100, eval_every=500, gradient_diagnostics=False
    )
    chunk = eqx.filter_jit(bpo.chunk)
    state, _ = chunk(bpo.init(jr.key(0)))
    jax.block_until_ready(state)
    loop = _HostLoop(bpo, state)
    steps = bpo.episodes_per_chunk * horizon
    loop.run(horizon, jr.key(1))  # compile the loop's pieces

    def ours():
        jax.block_until_ready(chunk(state))

    ours_times, theirs = _interleave(ours, lambda: loop.run(steps, jr.key(2)), rounds=3)
    case = {
        "horizon": horizon,
        "model": model_name,
        "env_steps_per_round": steps,
        "ours_env_steps_per_s": steps / statistics.median(ours_times),
        "host_loop_env_steps_per_s": steps / statistics.median(theirs),
        **_speedup(ours_times, theirs),
    }
    agents_results["throughput"][model_name] = case


# ---- seeds vmapped against one after another -----------------------------------


def test_vmapped_seeds_against_sequential_runs(benchmark, agents_results):
    """8 seeds in one program, on one device and sharded over every host device
    (one per core), against 8 runs one after another; and the same for the
    collection alone (warm-up only, no updates), which shows where vmapping gains:
    the updates already fill a core with the policy batch's work."""
    require_timing(benchmark)
    seeds, env_steps = 8, 2000
    env = diffenvs.make("cancer", horizon=100)
    keys = jr.split(jr.key(0), seeds)
    case: dict[str, Any] = {
        "task": "cancer", "horizon": 100, "seeds": seeds,
        "env_steps_per_seed": env_steps, "devices": len(jax.devices()),
        "target_speedup": TARGET_SEED_SPEEDUP, "rounds": 3,
    }  # fmt: skip
    for phase, bpo in (
        ("training", agents.BPO(env)),
        ("collection", agents.BPO(env, warmup_steps=env_steps)),
    ):

        def apart(bpo=bpo):
            for k in keys:
                bpo.train(k, env_steps)

        for name, devices in (("vmapped", None), ("sharded", jax.devices())):

            def together(bpo=bpo, devices=devices):
                bpo.train(jr.key(0), env_steps, seeds=seeds, devices=devices)

            ours, theirs = _interleave(together, apart, rounds=3)
            speedup = _speedup(ours, theirs)
            prefix = name if phase == "training" else f"{phase}_{name}"
            case[f"{prefix}_env_steps_per_s"] = (
                seeds * env_steps / speedup["ours_median_s"]
            )
            case[f"{prefix}_speedup_median"] = speedup["speedup_median"]
            case[f"{prefix}_speedup_min"] = speedup["speedup_min"]
            case[f"{prefix}_speedup_max"] = speedup["speedup_max"]
            if phase == "training":
                case["sequential_env_steps_per_s"] = (
                    seeds * env_steps / speedup["baseline_median_s"]
                )
    case["speedup_median"] = max(
        case["vmapped_speedup_median"], case["sharded_speedup_median"]
    )
    case["meets_target"] = case["speedup_median"] >= TARGET_SEED_SPEEDUP
    agents_results["seeds"]["cancer_H100"] = case


# ---- compile time ---------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["simulator", "awm-transformer"])
def test_chunk_compile_time(model_name, benchmark, agents_results):
    require_timing(benchmark)
    env = diffenvs.make(TASK, horizon=100)
    model = None
    if model_name != "simulator":
        model = worldmodels.make(model_name, env, key=jr.key(0))
    bpo = agents.BPO(env, model)
    state = bpo.init(jr.key(0))
    start = time.perf_counter()
    lowered = eqx.filter_jit(bpo.chunk).lower(state)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compiled = time.perf_counter() - start
    agents_results["compile"][model_name] = {
        "horizon": 100,
        "trace_and_lower_s": traced,
        "compile_s": compiled,
    }


def _lines(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, case in results["policy_update"].items():
        lines.append(
            f"policy update, awm-transformer {name} batch {case['batch']}: "
            f"{format_time(case['ours_median_s'])} against "
            f"{format_time(case['baseline_median_s'])} for the sequential unroll "
            f"({case['speedup_median']:.1f}x faster, "
            f"{case['memory_ratio']:.1f}x less scratch memory)"
        )
    for name, case in results["throughput"].items():
        lines.append(
            f"training throughput, {name} H = {case['horizon']}: "
            f"{case['ours_env_steps_per_s']:.0f} environment steps/s against "
            f"{case['host_loop_env_steps_per_s']:.0f} for a host loop "
            f"({case['speedup_median']:.1f}x)"
        )
    for case in results["seeds"].values():
        lines.append(
            f"{case['seeds']} seeds in one program: "
            f"{case['vmapped_speedup_median']:.1f}x the throughput of "
            f"{case['seeds']} runs one after another on one device, "
            f"{case['sharded_speedup_median']:.1f}x sharded over "
            f"{case['devices']} (target {case['target_speedup']}x); collection "
            f"alone {case['collection_vmapped_speedup_median']:.1f}x and "
            f"{case['collection_sharded_speedup_median']:.1f}x"
        )
    for name, case in results["compile"].items():
        lines.append(
            f"compile one chunk, {name} H = {case['horizon']}: "
            f"{case['trace_and_lower_s']:.1f} s to trace, "
            f"{case['compile_s']:.1f} s to compile"
        )
    return lines
