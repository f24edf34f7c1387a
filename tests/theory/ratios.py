"""The observed/bound ratios of the theory tests, and the table of them in
`docs/theory.md`.

Every test that checks a bound calls `record(key, observed, bound)` with the
quantities it compares. The ratio observed / bound is kept per statement (its
smallest and largest value over all examples and all entries, and the number of
calls). With the environment variable `THEORY_TABLE` set to a Markdown file, a
full run of `tests/theory` that passes rewrites the table between the markers
`<!-- ratios:start -->` and `<!-- ratios:end -->` of that file
(`tests/theory/conftest.py`):

    THEORY_TABLE=docs/theory.md .venv/bin/python -m pytest tests/theory -q

The table is only written from the `default` Hypothesis profile (derandomised, so
the same run gives the same table) and only when every statement below was
recorded, so a partial run cannot leave a partial table.
"""

import math
import pathlib
import re
from typing import NamedTuple

import numpy as np

START, END = "<!-- ratios:start -->", "<!-- ratios:end -->"


class Statement(NamedTuple):
    """A row of the table.

    Attributes:
        label: the statement, as `docs/theory.md` names it.
        bound: the bound the ratio is taken against.
        verdict: what the ratios show: an upper bound holds when every ratio is at
            most 1, a lower bound when every ratio is at least 1; a printed bound
            fails when some ratio is on the wrong side of 1.
    """

    label: str
    bound: str
    verdict: str


STATEMENTS: dict[str, Statement] = {
    "prop1": Statement(
        "Prop. 1", "‖∇θJ‖ through the simulator / through the f-RNN", "equality"
    ),
    "cor21_pair": Statement(
        "Cor. 2.1, per pair", "‖W_o‖‖W_a‖η^{t−k−1}", "holds (upper), attained"
    ),
    "cor21_gradient": Statement(
        "Cor. 2.1, gradient", "L_r L_π ‖W_o‖‖W_a‖ S_H(η)", "holds (upper)"
    ),
    "cor21_order": Statement(
        "Cor. 2.1, printed order, η = 1/2", "η^H", "fails (ratio unbounded)"
    ),
    "cor21_spectral_radius": Statement(
        "Cor. 2.1 (ICLR), η from ρ(W_x)",
        "‖W_o‖‖W_a‖(ρ(W_x)/β)^{t−k−1}",
        "fails (ratio ∞: bound 0)",
    ),
    "a2_printed_pair": Statement(
        "App. A.2, printed per pair", "‖W_o‖‖W_a‖(‖W_x‖γ)^{t−k}", "fails (lower)"
    ),
    "a2_pair": Statement(
        "App. A.2, corrected per pair",
        "‖W_o‖‖W_a‖(‖W_x‖γ)^{t−k−1}",
        "holds (lower)",
    ),
    "a2_gradient_threshold": Statement(
        "App. A.2, printed gradient bound, η = η*_H ± 1%",
        "L_r L_π ‖W_o‖‖W_a‖ η^{H−1}",
        "holds below η*_H, fails above",
    ),
    "a2_equality": Statement(
        "App. A.2, Thm. 2 as an equality, its conditions met",
        "L_r L_π Σ ‖∂ŝ_t/∂a_k‖",
        "equality",
    ),
    "a2_equality_unmet": Statement(
        "App. A.2, Thm. 2 as an equality, conditions unmet",
        "L_r L_π Σ ‖∂ŝ_t/∂a_k‖",
        "strict inequality",
    ),
    "cor22_printed_pair": Statement(
        "Cor. 2.2, printed per pair", "‖W_v‖ + αΣ_{i<t}‖W_v‖", "fails (upper)"
    ),
    "cor22_pair": Statement(
        "Cor. 2.2, corrected per pair",
        "c_k‖W_v‖(1 + 2λ) + 1{k=t−1} λ‖W_v‖",
        "holds (upper)",
    ),
    "cor22_row": Statement(
        "Cor. 2.2, row sum, sharp constant",
        "‖W_v‖(1 + 2λ), λ = α²‖W_qᵀW_k‖",
        "holds (upper), nearly attained",
    ),
    "cor22_row_loose": Statement(
        "Cor. 2.2, row sum, cruder constant",
        "‖W_v‖(1 + 4α²‖W_q‖‖W_k‖)",
        "holds (upper)",
    ),
    "cor22_witness": Statement(
        "Cor. 2.2, witness family, λ = 10 … 1000, H = 33 … 129",
        "‖W_v‖(1 + 2λ)",
        "ratio → 1",
    ),
    "cor22_witness_loose": Statement(
        "Cor. 2.2, witness family, cruder constant",
        "‖W_v‖(1 + 4α²‖W_q‖‖W_k‖)",
        "ratio → 1/2",
    ),
    "cor22_uniform": Statement(
        "Cor. 2.2, uniform attention, total", "H‖W_v‖", "equality (order H attained)"
    ),
    "cor22_gradient": Statement(
        "Cor. 2.2, gradient", "L_r L_π H ‖W_v‖(1 + 2λ)", "holds (upper)"
    ),
    "thm1_printed": Statement(
        "Thm. 1, printed per pair, history model",
        "L_a + L_s^{t−k}",
        "fails (upper)",
    ),
    "thm1_a1_model": Statement(
        "Thm. 1 under App. A.1's assumption, L_s = 2, H = 40",
        "H L_r + H² L_π + H² L_a + H² L_s^H",
        "fails (upper)",
    ),
    "thm1_additive": Statement(
        "Thm. 1, additive constants, L_r = L_π = L_a = 10 and 100",
        "H L_r + H² L_π + H² L_a + H² L_s^H",
        "fails (upper)",
    ),
    "thm1_recursion": Statement(
        "Thm. 1, recursion (*), minimal HWM, lags ≥ 1",
        "(*) with measured local norms",
        "holds (upper)",
    ),
    "thm1_closed_form": Statement(
        "Thm. 1, corrected per pair, minimal HWM, lags ≥ 1",
        "L_a(1 + L_s)^{t−k−1}",
        "holds (upper)",
    ),
    "thm1_markov": Statement(
        "Thm. 1, Markov form, minimal model, lags ≥ 1",
        "L_a L_s^{t−k−1}",
        "holds (upper)",
    ),
    "thm1_gradient": Statement(
        "Thm. 1, gradient, minimal HWM",
        "L_r L_π L_a Σ (1 + L_s)^{t−k−1}",
        "holds (upper)",
    ),
    "thm1_package_recursion": Statement(
        "Thm. 1, recursion (*), package models, lags ≥ 1",
        "(*) with measured local norms",
        "holds (upper)",
    ),
    "thm1_package_closed_form": Statement(
        "Thm. 1, corrected per pair, package models, lags ≥ 1",
        "L_a(1 + L_s)^{t−k−1} (Markov: L_a L_s^{t−k−1})",
        "holds (upper)",
    ),
    "thm1_package_summed": Statement(
        "Thm. 1, summed sensitivity, package models, lags ≥ 1",
        "L_a Σ_{d<t−k} L_Σ^d",
        "holds (upper)",
    ),
    "a1_lower": Statement("App. A.1, longest path", "ℓ_a ℓ_s^{t−k−1}", "holds (lower)"),
    "thm2_package": Statement(
        "Thm. 2, package AWMs, sequential gradient",
        "L_r L_π Σ ‖∂ŝ_t/∂a_k‖",
        "holds (upper)",
    ),
    "thm2_middle_step": Statement(
        "Thm. 2 and Thm. 1 proofs, L_r L_π taken into the norm, counterexample",
        "L_r L_π ‖Σ_t Σ_k ∂ŝ_t/∂a_k‖",
        "fails (upper)",
    ),
    "thm2_middle_step_package": Statement(
        "Thm. 2 proof's middle step, package AWMs",
        "L_r L_π ‖Σ_t Σ_k ∂ŝ_t/∂a_k‖",
        "recorded, not asserted",
    ),
    "transformer_rows": Statement(
        "Production transformer AWM, largest row sum at 63 ≤ t ≤ 255",
        "the largest row sum at t ≤ 31",
        "bounded in t",
    ),
    "stop_gradient": Statement(
        "Without stop-gradient, integrator AWM, κ = 0.1, H = 30",
        "‖∇θJ‖ with the stop-gradient",
        "ratio grows like (1 + κ)^H / H²",
    ),
    "remark1": Statement(
        "Remark 1, package Markov model, teacher-forced loss gradient",
        "‖∇ψ‖ of eq. 6",
        "equality",
    ),
    "chaos_markov": Statement(
        "Fig. 4b simulator, Markov form of Thm. 1",
        "‖∂x_1/∂a_0‖ Π ‖∂f_k/∂x_k‖",
        "holds (upper), far from tight",
    ),
}

_ratios: dict[str, list[float]] = {}  # key -> [smallest, largest, calls]


def record(key: str, observed, bound) -> None:
    """Keep the ratios observed / bound, elementwise, of statement `key`.

    Entries where both are zero (a causal block above the diagonal) carry no
    information and are left out; a zero bound under a positive observation is
    an infinite ratio.
    """
    if key not in STATEMENTS:
        raise KeyError(f"unknown statement {key!r}; add it to STATEMENTS.")
    observed, bound = np.broadcast_arrays(
        np.asarray(observed, float), np.asarray(bound, float)
    )
    keep = (observed != 0) | (bound != 0)
    if not np.any(keep):
        return
    with np.errstate(divide="ignore"):
        ratio = observed[keep] / bound[keep]
    entry = _ratios.setdefault(key, [math.inf, -math.inf, 0])
    entry[0] = min(entry[0], float(np.min(ratio)))
    entry[1] = max(entry[1], float(np.max(ratio)))
    entry[2] += 1


def missing() -> list[str]:
    """The statements that no test has recorded in this run."""
    return [key for key in STATEMENTS if key not in _ratios]


def _number(x: float) -> str:
    if math.isinf(x):
        return "∞"
    if x != 1 and abs(x - 1) < 1e-3:
        # Four significant digits would print 1; the distance to 1 is the news.
        return f"1 {'+' if x > 1 else '−'} {abs(x - 1):.1e}"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.4g}"


def table() -> str:
    """The Markdown table of every statement's recorded ratios."""
    lines = [
        "| Statement | Bound | Verdict | min observed/bound | max observed/bound "
        "| calls |",
        "|---|---|---|---|---|---|",
    ]
    for key, statement in STATEMENTS.items():
        low, high, calls = _ratios[key]
        lines.append(
            f"| {statement.label} | {statement.bound} | {statement.verdict} | "
            f"{_number(low)} | {_number(high)} | {calls} |"
        )
    return "\n".join(lines)


def write_table(path: pathlib.Path) -> None:
    """Replace the text between the markers of `path` by `table()`."""
    text = path.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {START} ... {END} section.")
    path.write_text(pattern.sub(f"{START}\n{table()}\n{END}", text))


def table_rows(text: str) -> list[tuple[str, str, str]]:
    """(statement, bound, verdict) of each row of the generated section of a
    document's text."""
    section = text.split(START, 1)[1].split(END, 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [tuple(row[2:].split(" | ")[:3]) for row in rows[1:]]
