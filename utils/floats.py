"""Sums of Python floats in the order given.

From Python 3.12 on, `sum()` of floats compensates rounding (Neumaier), so its result can
differ in the last bits from adding left to right, as 3.11's `sum()` does; logged losses and
scores must not depend on the Python version.
"""
from __future__ import annotations

from functools import reduce
from operator import add
from typing import Iterable


def sum_in_order(values: Iterable[float]) -> float:
    """((v0 + v1) + v2) + ...: each addition rounded, left to right; 0.0 for no values."""
    return float(reduce(add, values, 0.0))
