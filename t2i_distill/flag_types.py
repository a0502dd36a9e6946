"""argparse ``type=`` converters that range-check at parse time, so a bad number is refused with the flag's name
(argparse: "argument --learning_rate: expected a finite number > 0, got '-1'") before anything loads, never replaced
by a default. NaN and infinities are refused everywhere."""

from __future__ import annotations

import argparse
import math

__all__ = ["finite_float", "nonnegative_float", "nonnegative_int", "positive_float", "positive_int", "unit_interval"]


def _number(value: str, kind=float):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind is float and not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def finite_float(value: str) -> float:
    return _number(value)


def positive_float(value: str) -> float:
    number = _number(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value!r}")
    return number


def nonnegative_float(value: str) -> float:
    number = _number(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value!r}")
    return number


def unit_interval(value: str) -> float:
    number = _number(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}")
    return number


def positive_int(value: str) -> int:
    number = _number(value, int)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def nonnegative_int(value: str) -> int:
    number = _number(value, int)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number
