"""Small argument checks the engine's classes share, so each rule is written once.

- ``is_int(v)`` / ``is_real(v)``: an integer / a real number, Python or numpy, but not a bool (``True`` is an
  int to Python, never a count or a size here);
- ``positive_int(value, name)``: ``value`` as an int >= 1, else ``InputError`` "NAME must be a positive int";
- ``listed_rows(mask)``: the rows a boolean mask flags, as error messages show them: ``("[3, 7, ...]", count)``.

The error messages stay those of the callers: each caller words its own, these only decide.
"""

from __future__ import annotations

import numbers
import operator

import numpy as np

from engine.errors import InputError


def is_int(value) -> bool:
    """An integer (``int``, numpy integer, any ``numbers.Integral``) that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (``int``, ``float``, numpy numbers, any ``numbers.Real``) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(value, name: str) -> int:
    """``value`` as an int >= 1 (anything with ``__index__`` but a bool); ``InputError`` naming ``name`` else."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be a positive int, got {value!r}") from None
    if v <= 0:
        raise InputError(f"{name} must be a positive int, got {v}")
    return v


def listed_rows(mask, limit: int = 10) -> tuple[str, int]:
    """The rows ``mask`` (a boolean array) flags, as ``"[i, j, ...]"`` (the first ``limit``), and how many."""
    rows = np.flatnonzero(mask)
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return f"[{shown}{', ...' if rows.size > limit else ''}]", int(rows.size)
