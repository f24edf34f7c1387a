"""The observed/bound table of `docs/theory.md` lists exactly the statements the
tests record (`theory.ratios`), with their current bounds and verdicts. Its
numbers come from a run of the suite (`THEORY_TABLE=docs/theory.md`); this test
checks that the table has not fallen behind the list of statements."""

import pathlib

from theory.ratios import STATEMENTS, table_rows

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "theory.md"


def test_the_table_lists_every_statement():
    rows = table_rows(DOC.read_text())
    expected = [(s.label, s.bound, s.verdict) for s in STATEMENTS.values()]
    assert rows == expected, (
        "docs/theory.md's ratios table is out of date: regenerate it with "
        "THEORY_TABLE=docs/theory.md python -m pytest tests/theory"
    )
