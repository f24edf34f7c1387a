"""Timing helpers shared by the benchmarks: interleaved rounds against a baseline
measured in the same run, ratio statistics, and a description of the machine."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest

try:
    import resource
except ImportError:  # not on Windows
    resource = None

# Time budget per comparison (both sides together), and bounds on the rounds.
MEASURE_S = 8.0
MIN_ROUNDS = 30
MAX_ROUNDS = 10_000


@dataclasses.dataclass(frozen=True)
class Interleaved:
    """Per-round times (seconds) and minor page faults of a candidate and its
    baseline, measured in the same rounds."""

    candidate: list[float]
    baseline: list[float]
    candidate_faults: list[int]
    baseline_faults: list[int]


def minor_faults() -> int:
    if resource is None:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(
    benchmark, candidate: Callable[[], Any], baseline: Callable[[], Any]
) -> Interleaved:
    """Time `candidate` with pytest-benchmark and `baseline` here, one call of each
    per round, the baseline before the candidate in even rounds and after it in odd
    ones. Both must block until their result is ready and be compiled already.

    Page faults are counted around each call but outside the timed region: a large
    temporary buffer that comes fresh from the operating system costs a fault per
    page, which can dominate a batched call (see benchmarks/README.md).
    """
    require_timing(benchmark)
    estimate = quick_time(candidate) + quick_time(baseline)
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, MEASURE_S / estimate)))
    baseline_times: list[float] = []
    baseline_faults: list[int] = []
    candidate_faults: list[int] = []
    round_index = 0
    faults_before_candidate = 0

    def time_baseline() -> None:
        faults = minor_faults()
        start = time.perf_counter()
        baseline()
        baseline_times.append(time.perf_counter() - start)
        baseline_faults.append(minor_faults() - faults)

    def setup() -> None:
        nonlocal faults_before_candidate
        if round_index % 2 == 0:
            time_baseline()
        faults_before_candidate = minor_faults()

    def teardown() -> None:
        nonlocal round_index
        candidate_faults.append(minor_faults() - faults_before_candidate)
        if round_index % 2 == 1:
            time_baseline()
        round_index += 1

    benchmark.pedantic(candidate, setup=setup, teardown=teardown, rounds=rounds)
    candidate_times = list(benchmark.stats.stats.data)
    assert len(candidate_times) == len(baseline_times) == rounds
    return Interleaved(
        candidate_times, baseline_times, candidate_faults, baseline_faults
    )


def require_timing(benchmark) -> None:
    # With --benchmark-disable, pytest-benchmark runs the target once, untimed.
    if benchmark.disabled:
        pytest.skip("pytest-benchmark timing is disabled (--benchmark-disable)")


def quick_time(function: Callable[[], Any], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ratio_stats(numerator: list[float], denominator: list[float]) -> dict[str, Any]:
    ratios = [n / d for n, d in zip(numerator, denominator, strict=True)]
    p25, p50, p75 = statistics.quantiles(ratios, n=4)
    return {
        "ratio_median": p50,
        "ratio_p25": p25,
        "ratio_p75": p75,
        "ratio_of_minima": min(numerator) / min(denominator),
        "rounds": len(ratios),
    }


def format_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "cpu": model,
        "cores_available": cores,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(device) for device in jax.devices()],
        "jax": jax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "x64": bool(jax.config.jax_enable_x64),
    }
