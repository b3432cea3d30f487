"""Click parameter types that validate numbers: finite, in range, with the allowed range in the message."""
from __future__ import annotations

import math
import re

import click

_INT = re.compile(r"[+-]?[0-9]+")


class Number(click.ParamType):
    """A finite int or float within [low, high] (either end open or absent). Rejects nan/inf, bools, and
    non-ASCII digits; the error names the allowed range, e.g. "must be a finite number in (0, 10]"."""

    def __init__(self, kind: type = float, low=None, high=None, low_open: bool = False, high_open: bool = False):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.name = "integer" if kind is int else "float"

    @staticmethod
    def _fmt(v) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    def describe(self) -> str:
        f = self._fmt
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{f(self.low)}, {f(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {f(self.low)}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {f(self.high)}"
        return what

    def in_range(self, v) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return True

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            self.fail(f"{value!r} is not {self.describe()}", param, ctx)
        if isinstance(value, (int, float)) and not (self.kind is int and isinstance(value, float)):
            number = self.kind(value) if math.isfinite(value) else value
        else:
            text = str(value).strip()
            try:
                if self.kind is int:
                    if not _INT.fullmatch(text):
                        raise ValueError
                    number = int(text)
                else:
                    number = float(text)
            except (ValueError, OverflowError):
                self.fail(f"{str(value)[:40]!r} must be {self.describe()}", param, ctx)
        if self.kind is float and not math.isfinite(number):
            self.fail(f"{str(value)[:40]!r} must be {self.describe()}", param, ctx)
        if not self.in_range(number):
            self.fail(f"{str(value)[:40]} is out of range: must be {self.describe()}", param, ctx)
        return number

    def __repr__(self) -> str:
        return f"Number({self.describe()})"


SEED_MAX = 2**32 - 1
Seed = Number(int, 0, SEED_MAX)
