"""Checks of numeric settings, shared by the Python API and the CLI's argument types.

NaN passes every comparison test written as ``x <= 0``, so finiteness is checked first, always.
"""

from __future__ import annotations

import math

from .errors import TokenbridgeError

SEED_MAX = 2**32 - 1


def number(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, integer: bool = False):
    """``value`` if it is a finite number within the bounds, else a TokenbridgeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenbridgeError(f"{name} must be a number, not {value!r}")
    if integer and not isinstance(value, int):
        if not (isinstance(value, float) and value.is_integer()):
            raise TokenbridgeError(f"{name} must be a whole number, not {value!r}")
        value = int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise TokenbridgeError(f"{name} must be a finite number, not {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise TokenbridgeError(f"{name} must be {_range(low, high, low_open, high_open)}, not {value}")
    return value


def seed(value, name: str = "--seed") -> int:
    """A seed: a whole number from 0 to 2**32 - 1."""
    return number(name, value, low=0, high=SEED_MAX, integer=True)


def _range(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"{'above' if low_open else 'at least'} {low} and {'below' if high_open else 'at most'} {high}"
    if low is not None:
        return f"{'above' if low_open else 'at least'} {low}"
    return f"{'below' if high_open else 'at most'} {high}"
