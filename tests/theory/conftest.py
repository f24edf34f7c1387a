"""Writes the observed/bound table of `docs/theory.md` after a full run, when asked
to by the environment variable `THEORY_TABLE` (see `theory.ratios`)."""

import os
import pathlib
import sys

from hypothesis import settings
from theory import ratios

# The table's own check (`test_ratio_table.py`) fails exactly when the table is
# out of date, which is what writing it fixes; any other failure stops the write.
_TABLE_TEST = "test_ratio_table.py"
_failed: set[str] = set()


def pytest_runtest_logreport(report):
    if report.failed:
        _failed.add(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("THEORY_TABLE")
    if not target:
        return
    reason = None
    if exitstatus not in (0, 1) or any(_TABLE_TEST not in n for n in _failed):
        reason = "the run did not pass"
    elif settings.get_current_profile_name() != "default":
        reason = "the table comes from the default Hypothesis profile only"
    elif ratios.missing():
        reason = f"not every statement was recorded: {', '.join(ratios.missing())}"
    if reason:
        print(f"\nTHEORY_TABLE: {target} left unchanged, {reason}.", file=sys.stderr)
        return
    ratios.write_table(pathlib.Path(target))
    print(f"\nTHEORY_TABLE: wrote the ratios table of {target}.", file=sys.stderr)
