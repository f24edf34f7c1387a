"""Speed of `diffenvs`, each number measured against a baseline in the same run.

1. `predict`, and `jax.grad` of the return, against a hand-written fused Euler
   `jax.lax.scan` of the same equations: tasks hiv and invasive_plant, H = 500,
   batch 1 and batch 1024 (`jax.vmap`). Ratio = package time / hand-written time;
   the target is at most 1.25.
2. Throughput (environment steps per second) of the jitted batched `predict` for 1024
   hiv environments against NumPy stepping the same batch in a Python loop over time.
3. Compile time from `diffenvs.make` to the first result of a fresh jitted `predict`
   and a fresh jitted `grad` (hiv, H = 500); the target is under 3 s on CPU.

Run with `pytest benchmarks --benchmark`. The numbers go to
`benchmarks/results/envs.json`, the plot to `benchmarks/results/envs.png`, and a summary
is printed at the end of the run.

How we time: pytest-benchmark times the package (`benchmark.pedantic`, one call per
round), and its `setup`/`teardown` hooks time the baseline on alternate sides of each
round, so the two share the machine's state round by round and neither always goes
first. A ratio is taken per round and we report its median and interquartile range:
on a shared machine the ratio of two medians measured minutes apart is at the mercy of
whatever else ran in between.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _timing import format_time, interleaved, machine, ratio_stats, require_timing

import diffenvs

HORIZON = 500
BATCH = 1024
TARGET_RATIO = 1.25
TARGET_COMPILE_S = 3.0
TASKS = ("hiv", "invasive_plant")


# ---- the equations, written out by hand (docs/envs.md) ---------------------------


@dataclasses.dataclass(frozen=True)
class HandWritten:
    """A control task written out by hand, independent of the package: f(x, u),
    g(x, u), g_T(x), the control box and the state bounds (neither task here
    depends on time)."""

    duration: float
    u_lo: float
    u_hi: float
    vector_field: Callable[[jax.Array, jax.Array], jax.Array]
    running_cost: Callable[[jax.Array, jax.Array], jax.Array]
    terminal_cost: Callable[[jax.Array], jax.Array] | None = None
    x_lo: tuple[float, ...] | None = None
    x_hi: tuple[float, ...] | None = None


def _hiv_derivatives(x, u, xp):
    """hiv's equations written once for both baselines: `x[..., i]` is a state
    dimension, `u` the control, `xp` the array module (jax.numpy or NumPy)."""
    cells, infected, virus = x[..., 0], x[..., 1], x[..., 2]
    infection = u * 2.4e-5 * cells * virus
    d_cells = (
        10.0 / (1.0 + virus)
        - 0.02 * cells
        + 0.03 * cells * (1.0 - (cells + infected) / 1500.0)
        - infection
    )
    d_infected = infection - 0.5 * infected
    d_virus = 300.0 * 0.5 * infected - 4.4 * virus
    return xp.stack([d_cells, d_infected, d_virus], axis=-1)


def _hiv_vector_field(x, u):
    return _hiv_derivatives(x, u[0], jnp)


def _hiv_running_cost(x, u):
    return -(0.05 * x[0] - (1.0 - u[0]) ** 2)


def _plant_vector_field(x, u):
    return 1.0 * x / (0.01 + x) * (1.0 - u) - u * x


def _plant_running_cost(x, u):
    return 1.0 * jnp.sum(u**2)


def _plant_terminal_cost(x):
    return jnp.sum(x)


HAND_WRITTEN = {
    "hiv": HandWritten(
        duration=20.0,
        u_lo=0.0,
        u_hi=1.0,
        vector_field=_hiv_vector_field,
        running_cost=_hiv_running_cost,
        x_lo=(0.0, 0.0, 0.0),
        x_hi=(1600.0, 100.0, 100.0),
    ),
    "invasive_plant": HandWritten(
        duration=10.0,
        u_lo=0.0,
        u_hi=1.0,
        vector_field=_plant_vector_field,
        running_cost=_plant_running_cost,
        terminal_cost=_plant_terminal_cost,
    ),
}


def _control(task: HandWritten, action):
    action = jnp.clip(action, -1.0, 1.0)
    return task.u_lo + (action + 1.0) * 0.5 * (task.u_hi - task.u_lo)


def _euler(task: HandWritten, dt: float, x, u):
    x = x + dt * task.vector_field(x, u)
    if task.x_lo is not None and task.x_hi is not None:
        x = jnp.clip(x, jnp.asarray(task.x_lo), jnp.asarray(task.x_hi))
    return x


def hand_written_states(task: HandWritten, s1, actions):
    """The states x_1 ... x_H, shape `(horizon, state_dim)`: one Euler `scan`."""
    dt = task.duration / actions.shape[0]

    def body(x, action):
        x = _euler(task, dt, x, _control(task, action))
        return x, x

    _, states = jax.lax.scan(body, s1, actions)
    return states


def hand_written_return(task: HandWritten, s1, actions):
    """The return: one Euler `scan` that accumulates -g dt as it goes, then -g_T."""
    dt = task.duration / actions.shape[0]

    def body(carry, action):
        x, total = carry
        u = _control(task, action)
        total = total - task.running_cost(x, u) * dt
        return (_euler(task, dt, x, u), total), None

    (x, total), _ = jax.lax.scan(body, (s1, jnp.zeros((), s1.dtype)), actions)
    if task.terminal_cost is not None:
        total = total - task.terminal_cost(x)
    return total


def numpy_hiv_predict(s1: np.ndarray, actions: np.ndarray, dt: float) -> np.ndarray:
    """hiv's batched `predict` as a user without JAX would write it: a Python loop
    over time, vectorised over the batch. `s1` has shape `(3,)`, `actions` shape
    `(batch, horizon, 1)`; returns the states, shape `(batch, horizon, 3)`, in the
    dtype of `actions`."""
    batch, horizon, _ = actions.shape
    dtype = actions.dtype
    lo = np.array([0.0, 0.0, 0.0], dtype)
    hi = np.array([1600.0, 100.0, 100.0], dtype)
    u = (np.clip(actions[:, :, 0], -1.0, 1.0) + 1.0) * 0.5
    x = np.tile(s1.astype(dtype), (batch, 1))
    states = np.empty((batch, horizon, 3), dtype)
    for k in range(horizon):
        dx = _hiv_derivatives(x, u[:, k], np)
        x = np.clip(x + dt * dx, lo, hi)
        states[:, k] = x
    return states


# ---- helpers --------------------------------------------------------------------


def _actions(key, action_dim: int, batch: int | None) -> jax.Array:
    # Slightly outside [-1, 1], so that the clip is part of what is compared.
    shape = (HORIZON, action_dim) if batch is None else (batch, HORIZON, action_dim)
    return jr.uniform(key, shape, minval=-1.2, maxval=1.2)


def _assert_close(actual, expected, *, rtol: float, what: str) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    # Relative to the largest entry as well: states and gradients span several
    # orders of magnitude, and the smallest entries carry only absolute error.
    atol = rtol * float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def _case_name(task: str, quantity: str, batch: int) -> str:
    return f"{task}/{quantity}/batch{batch}"


# ---- results: collected over the module, written once at the end ----------------


@pytest.fixture(scope="module")
def envs_results(write_results, results_dir: Path, summary) -> Iterator[dict]:
    results: dict[str, dict[str, Any]] = {"speed": {}, "throughput": {}, "compile": {}}
    yield results
    if not any(results.values()):
        return
    numbers = {
        "machine": machine(),
        "horizon": HORIZON,
        "batch": BATCH,
        "target_ratio": TARGET_RATIO,
        "target_compile_s": TARGET_COMPILE_S,
        **{section: entries for section, entries in results.items() if entries},
    }
    path = write_results("envs", numbers)
    _plot(path, results_dir / "envs.png")
    summary("diffenvs speed (benchmarks/results/envs.json)", _summary_lines(results))


def _summary_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    about = machine()
    lines = [
        f"{about['cpu']}, cores available: {about['cores_available']}, "
        f"JAX {about['jax']} on {about['jax_backend']}, horizon {HORIZON}"
    ]
    if results["speed"]:
        lines += [
            "",
            "package vs hand-written scan: median time per call; ratio per round "
            "(median, IQR); ratio of the fastest rounds; median minor page faults "
            "per call (package/by hand)",
            f"{'case':34s}{'package':>11s}{'by hand':>11s}{'ratio':>8s}{'IQR':>12s}"
            f"{'fastest':>9s}{'faults':>13s}  target <= {TARGET_RATIO}",
        ]
        for name, case in results["speed"].items():
            iqr = f"{case['ratio_p25']:.2f}-{case['ratio_p75']:.2f}"
            faults = (
                f"{case['package_page_faults_median']:.0f}/"
                f"{case['baseline_page_faults_median']:.0f}"
            )
            lines.append(
                f"{name:34s}{format_time(case['package_median_s']):>11s}"
                f"{format_time(case['baseline_median_s']):>11s}"
                f"{case['ratio_median']:>8.2f}{iqr:>12s}"
                f"{case['ratio_of_minima']:>9.2f}{faults:>13s}  "
                f"{'met' if case['meets_target'] else 'MISSED'}"
            )
    if results["throughput"]:
        lines += ["", "batched predict, env steps per second (hiv, batch 1024)"]
        for name, case in results["throughput"].items():
            lines.append(
                f"{name:34s}package {case['package_steps_per_s']:.3g}/s, "
                f"NumPy {case['numpy_steps_per_s']:.3g}/s, "
                f"speed-up {case['speedup_median']:.1f}x "
                f"(IQR {case['speedup_p25']:.1f}-{case['speedup_p75']:.1f})"
            )
    if results["compile"]:
        case = results["compile"]["hiv"]
        lines += [
            "",
            f"make + first jitted predict + first jitted grad (hiv): "
            f"{case['total_s_median']:.2f} s (target < {TARGET_COMPILE_S} s: "
            f"{'met' if case['meets_target'] else 'MISSED'}); predict "
            f"{case['predict_s_median']:.2f} s, grad {case['grad_s_median']:.2f} s, "
            f"of which XLA compilation {case['xla_compile_s_median']:.2f} s; rounds: "
            + ", ".join(f"{total:.2f} s" for total in case["total_s"]),
        ]
    return lines


def _plot(json_path: Path, png_path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    numbers = json.loads(json_path.read_text())
    speed = numbers.get("speed", {})
    throughput = numbers.get("throughput", {})
    if not speed and not throughput:
        return
    figure = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, width_ratios=(3, 1))

    names = sorted(speed)
    positions = range(len(names))
    medians = [speed[name]["ratio_median"] for name in names]
    errors = [
        [speed[n]["ratio_median"] - speed[n]["ratio_p25"] for n in names],
        [speed[n]["ratio_p75"] - speed[n]["ratio_median"] for n in names],
    ]
    colours = ["tab:blue" if speed[n]["meets_target"] else "tab:red" for n in names]
    left.bar(positions, medians, yerr=errors, color=colours, capsize=3)
    left.plot(
        positions,
        [speed[n]["ratio_of_minima"] for n in names],
        "k.",
        label="ratio of the fastest rounds",
    )
    left.axhline(TARGET_RATIO, color="k", linestyle="--", label="target")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_xticks(positions, [n.replace("_", "\n").replace("/", "\n") for n in names])
    left.set_ylabel("package time / hand-written time")
    left.set_title(
        f"predict and grad, H = {HORIZON}: median ratio and IQR (red: over target)"
    )
    left.legend(loc="upper left")

    labels, values = [], []
    for case in (throughput[name] for name in sorted(throughput)):
        if not labels:
            labels.append("JAX\n(package)")
            values.append(case["package_steps_per_s"])
        labels.append(f"NumPy\n{case['numpy_dtype']}")
        values.append(case["numpy_steps_per_s"])
    if labels:
        bars = right.bar(range(len(labels)), values, color="tab:green")
        right.bar_label(bars, [f"{value:.2g}" for value in values])
        right.set_xticks(range(len(labels)), labels)
        right.set_ylabel("environment steps / s")
        right.set_title(f"hiv predict, batch {BATCH}")

    machine = numbers.get("machine", {})
    figure.suptitle(
        f"diffenvs speed: {machine.get('cpu', '?')}, "
        f"cores available: {machine.get('cores_available', '?')}, "
        f"JAX {machine.get('jax', '?')} ({machine.get('jax_backend', '?')})"
    )
    tmp = png_path.with_name(png_path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, png_path)


# ---- 0. the baseline is the same computation -------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_hand_written_loop_agrees(task: str):
    """Outside any timing: the hand-written scan gives the package's states, return
    and gradient, else the comparison below would be meaningless."""
    env = diffenvs.make(task, horizon=HORIZON)
    hand = HAND_WRITTEN[task]
    s1 = env.initial_state()
    package_states = jax.jit(lambda a: env.predict(s1, a))
    hand_states = jax.jit(lambda a: hand_written_states(hand, s1, a))
    package_return = jax.jit(jax.value_and_grad(lambda a: jnp.sum(env.rewards(s1, a))))
    hand_return = jax.jit(
        jax.value_and_grad(lambda a: hand_written_return(hand, s1, a))
    )
    for seed in range(3):
        actions = _actions(jr.key(seed), env.action_dim, batch=None)
        # float32 over 500 steps with the operations in another order (Diffrax takes
        # the step as t1 - t0): agreement to a few parts in 1e5.
        _assert_close(
            package_states(actions), hand_states(actions), rtol=1e-4, what="states"
        )
        package_value, package_grad = package_return(actions)
        hand_value, hand_grad = hand_return(actions)
        # A sum of 500 float32 rewards in another order: a few ulps of the total.
        _assert_close(package_value, hand_value, rtol=1e-5, what="return")
        # Reverse mode through 500 steps accumulates more rounding than the forward.
        _assert_close(package_grad, hand_grad, rtol=1e-3, what="gradient")


# ---- 1. package vs hand-written scan ---------------------------------------------


@pytest.mark.parametrize("batch", [1, BATCH], ids=["batch1", f"batch{BATCH}"])
@pytest.mark.parametrize("quantity", ["forward", "grad"])
@pytest.mark.parametrize("task", TASKS)
def test_speed_against_hand_written(
    task: str, quantity: str, batch: int, benchmark, envs_results
):
    env = diffenvs.make(task, horizon=HORIZON)
    hand = HAND_WRITTEN[task]
    s1 = env.initial_state()
    actions = _actions(jr.key(42), env.action_dim, None if batch == 1 else batch)

    if quantity == "forward":

        def package(a):
            return env.predict(s1, a)

        def baseline(a):
            return hand_written_states(hand, s1, a)

    else:
        package = jax.grad(lambda a: jnp.sum(env.rewards(s1, a)))
        baseline = jax.grad(lambda a: hand_written_return(hand, s1, a))
    if batch > 1:
        package, baseline = jax.vmap(package), jax.vmap(baseline)
    package, baseline = jax.jit(package), jax.jit(baseline)

    # Compiles both, outside the timed region, and checks that they agree.
    start = time.perf_counter()
    package_out = jax.block_until_ready(package(actions))
    package_compile_s = time.perf_counter() - start
    start = time.perf_counter()
    baseline_out = jax.block_until_ready(baseline(actions))
    baseline_compile_s = time.perf_counter() - start
    # Tolerances as in test_hand_written_loop_agrees.
    rtol = 1e-4 if quantity == "forward" else 1e-3
    _assert_close(package_out, baseline_out, rtol=rtol, what=f"{task} {quantity}")

    benchmark.group = f"{task} {quantity}"
    timings = interleaved(
        benchmark,
        lambda: jax.block_until_ready(package(actions)),
        lambda: jax.block_until_ready(baseline(actions)),
    )
    stats = ratio_stats(timings.candidate, timings.baseline)
    case = {
        "task": task,
        "quantity": quantity,
        "batch": batch,
        "horizon": HORIZON,
        "package_median_s": statistics.median(timings.candidate),
        "package_min_s": min(timings.candidate),
        "baseline_median_s": statistics.median(timings.baseline),
        "baseline_min_s": min(timings.baseline),
        "package_page_faults_median": statistics.median(timings.candidate_faults),
        "baseline_page_faults_median": statistics.median(timings.baseline_faults),
        "package_compile_s": package_compile_s,
        "baseline_compile_s": baseline_compile_s,
        **stats,
        "target": TARGET_RATIO,
        # Recorded, never asserted: a shared machine can push any single run over.
        "meets_target": stats["ratio_median"] <= TARGET_RATIO,
    }
    benchmark.extra_info.update(stats)
    envs_results["speed"][_case_name(task, quantity, batch)] = case


# ---- 2. batched throughput against NumPy -----------------------------------------


@pytest.mark.parametrize("numpy_dtype", ["float64", "float32"])
def test_batched_throughput_against_numpy(numpy_dtype: str, benchmark, envs_results):
    env = diffenvs.make("hiv", horizon=HORIZON)
    s1 = env.initial_state()
    actions = _actions(jr.key(7), env.action_dim, batch=BATCH)
    predict = jax.jit(jax.vmap(lambda a: env.predict(s1, a)))
    np_s1 = np.asarray(s1, dtype=numpy_dtype)
    np_actions = np.asarray(actions, dtype=numpy_dtype)

    package_states = jax.block_until_ready(predict(actions))
    numpy_states = numpy_hiv_predict(np_s1, np_actions, env.dt)
    # float64 NumPy against float32 JAX: float32 rounding over 500 steps.
    _assert_close(package_states, numpy_states, rtol=1e-4, what="NumPy hiv states")

    benchmark.group = "hiv batched predict vs NumPy"
    timings = interleaved(
        benchmark,
        lambda: jax.block_until_ready(predict(actions)),
        lambda: numpy_hiv_predict(np_s1, np_actions, env.dt),
    )
    steps = BATCH * HORIZON
    package_s = statistics.median(timings.candidate)
    numpy_s = statistics.median(timings.baseline)
    # Speed-up = NumPy time / package time, per round.
    speedup = ratio_stats(timings.baseline, timings.candidate)
    case = {
        "task": "hiv",
        "batch": BATCH,
        "horizon": HORIZON,
        "numpy_dtype": numpy_dtype,
        "package_median_s": package_s,
        "numpy_median_s": numpy_s,
        "package_steps_per_s": steps / package_s,
        "numpy_steps_per_s": steps / numpy_s,
        "speedup_median": speedup["ratio_median"],
        "speedup_p25": speedup["ratio_p25"],
        "speedup_p75": speedup["ratio_p75"],
        "rounds": speedup["rounds"],
    }
    benchmark.extra_info.update(speedup)
    envs_results["throughput"][f"hiv/numpy-{numpy_dtype}"] = case


# ---- 3. compile time ------------------------------------------------------------


def test_compile_time(benchmark, envs_results):
    """From `diffenvs.make` to the first result of a jitted predict and a jitted grad.

    Every round starts from `jax.clear_caches()` and builds new closures, so nothing
    is reused from JAX's in-memory caches; the persistent compilation cache, if one
    is configured, is switched off for the measurement.
    """
    actions = np.zeros((HORIZON, 1), np.float32)
    parts: dict[str, list[float]] = {"make": [], "predict": [], "grad": []}
    xla_compile_s = [0.0]

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            xla_compile_s[-1] += duration

    def setup() -> None:
        jax.clear_caches()
        xla_compile_s.append(0.0)

    def make_predict_grad() -> None:
        start = time.perf_counter()
        env = diffenvs.make("hiv", horizon=HORIZON)
        s1 = env.initial_state()
        made = time.perf_counter()
        predict = jax.jit(lambda a: env.predict(s1, a))
        jax.block_until_ready(predict(actions))
        predicted = time.perf_counter()
        grad = jax.jit(jax.grad(lambda a: jnp.sum(env.rewards(s1, a))))
        jax.block_until_ready(grad(actions))
        done = time.perf_counter()
        parts["make"].append(made - start)
        parts["predict"].append(predicted - made)
        parts["grad"].append(done - predicted)

    require_timing(benchmark)
    persistent_cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        benchmark.group = "compile"
        benchmark.pedantic(make_predict_grad, setup=setup, rounds=3)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        jax.config.update("jax_enable_compilation_cache", persistent_cache)

    totals = list(benchmark.stats.stats.data)
    case = {
        "task": "hiv",
        "horizon": HORIZON,
        "rounds": len(totals),
        "total_s": totals,
        "total_s_median": statistics.median(totals),
        "make_s_median": statistics.median(parts["make"]),
        "predict_s_median": statistics.median(parts["predict"]),
        "grad_s_median": statistics.median(parts["grad"]),
        "xla_compile_s_median": statistics.median(xla_compile_s[1:]),
        "target_s": TARGET_COMPILE_S,
        "meets_target": statistics.median(totals) < TARGET_COMPILE_S,
    }
    envs_results["compile"]["hiv"] = case
