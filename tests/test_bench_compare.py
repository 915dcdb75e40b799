"""bench/compare.py's reading of benchmark output: every printed number becomes a
figure with a stable name, so rounds of two revisions can be lined up."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.pure


def _load() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / "compare.py"
    spec = importlib.util.spec_from_file_location("bench_compare", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


compare = _load()

DECIDE = """\
policy: 500 rules; device: 300 apps
mailward evaluate                  39,955 decisions/s   p50     24.6 µs   p99     30.4 µs
ratio mailward/naive: 4,339x   p99 target < 50 µs: met
"""


def test_names_come_from_label_and_unit() -> None:
    """A line's label, the words before each number and its unit name the figure;
    thousands separators and glued units are read."""
    figures = compare.parse_figures(DECIDE)
    assert figures["mailward evaluate decisions/s"] == 39955
    assert figures["mailward evaluate p50 µs"] == 24.6
    assert figures["mailward evaluate p99 µs"] == 30.4
    assert figures["ratio mailward/naive x"] == 4339
    assert figures["policy device apps"] == 300


def test_table_columns_are_named_by_their_header() -> None:
    """In a right-aligned table a number takes the name of the header column it ends
    under; a blank line ends the table."""
    out = ("target              logins/s  FETCH MB/s\n"
           "direct                  1234       456.7\n"
           "mailward-cleartext                  99.1  (no TLS either side)\n"
           "\n"
           "ratio 0.91x\n")
    figures = compare.parse_figures(out)
    assert figures == {"direct logins/s": 1234, "direct FETCH MB/s": 456.7,
                       "mailward-cleartext FETCH MB/s": 99.1, "ratio x": 0.91}


def test_signs_words_with_digits_and_repeats() -> None:
    """``p99`` is a name, not a number; signed values keep their sign; a name met
    twice gets ``#2``; words after a unit say which figure it is."""
    out = ("kept +1.5 KiB idle, -0.3 KiB after a burst\n"
           "step 7 ms\nstep 8 ms\n")
    figures = compare.parse_figures(out)
    assert figures == {"kept KiB idle": 1.5, "kept KiB after a burst": -0.3,
                       "step ms": 7, "step ms #2": 8}


@given(st.text(max_size=300))
def test_any_output_parses(out: str) -> None:
    """Any text gives a mapping of names to finite numbers, never an exception."""
    figures = compare.parse_figures(out)
    assert all(isinstance(v, float) for v in figures.values())


def test_table_reports_medians_ratio_and_overlap() -> None:
    """Each row has both medians, new/base and each side's spread; spreads that do not
    overlap say which way the new side moved."""
    base = compare.Side("base", "b", Path("."), Path("python"))
    new = compare.Side("new", "n", Path("."), Path("python"))
    base.runs = [{"a ms": v, "b ms": v} for v in (10.0, 11.0, 12.0, 10.5, 11.5)]
    new.runs = [{"a ms": v, "b ms": v - 5.5} for v in (11.0, 11.5, 12.5, 10.0, 12.0)]
    rows = compare.table(base, new)
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name["a ms"] == ("a ms", "11", "11.5",
                               f"{11.5 / statistics.median([10, 11, 12, 10.5, 11.5]):.3f}",
                               "10-12", "10-12.5", "~")
    assert by_name["b ms"][-1] == "lower"
