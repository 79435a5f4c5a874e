"""Argument checks for every builder of the library.

Builders validate their hyper-parameters eagerly, on the host, so that a bad
value fails before any tracing or compilation. The error is an
:class:`InvalidArgument`, a ``ValueError`` that also carries the parameter's
name, so that the runner can name the config key at fault without parsing
the message.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


class InvalidArgument(ValueError):
    """A hyper-parameter out of range. ``name`` is the parameter's name."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def check_real(
    name: str,
    value,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
    strict_maximum: bool = False,
    allow_inf: bool = False,
) -> float:
    """Checks a real hyper-parameter and returns it as a float.

    Args:
      name: the parameter's name, used in the message.
      value: the value to check.
      minimum: optional lower bound.
      maximum: optional upper bound.
      strict_minimum: whether ``value`` must exceed ``minimum`` (else ``>=``).
      strict_maximum: whether ``value`` must stay below ``maximum`` (else ``<=``).
      allow_inf: whether ``+inf`` is accepted (e.g. an infinite clip norm).

    Returns:
      ``float(value)``.

    Raises:
      InvalidArgument: naming ``name`` for a non-number, NaN, a disallowed
        infinity or a value out of range.
    """
    ok = isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok and math.isinf(value):
        ok = allow_inf and value > 0
    if ok and minimum is not None:
        ok = value > minimum if strict_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if strict_maximum else value <= maximum
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if strict_minimum else '>='} {minimum}")
        if maximum is not None:
            bounds.append(f"{'<' if strict_maximum else '<='} {maximum}")
        where = f" {' and '.join(bounds)}" if bounds else ""
        kind = "a number (inf allowed)" if allow_inf else "a finite number"
        raise InvalidArgument(name, f"{name} must be {kind}{where}, got {value!r}")
    return float(value)


def check_int(name: str, value, *, minimum: int, maximum: int | None = None) -> int:
    """Checks an integer hyper-parameter in ``[minimum, maximum]`` and returns it.

    Raises:
      InvalidArgument: naming ``name`` for a non-integer or a value out of range.
    """
    ok = isinstance(value, Integral) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        high = "" if maximum is None else f" and <= {maximum}"
        raise InvalidArgument(name, f"{name} must be an int >= {minimum}{high}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value, *, minimum: int) -> int | None:
    """``None``, or :func:`check_int`'s value."""
    return None if value is None else check_int(name, value, minimum=minimum)


def check_choice(name: str, value, choices: tuple) -> str:
    """Raises InvalidArgument naming ``name`` unless ``value`` is one of ``choices``."""
    if isinstance(value, bool) or value not in choices:
        raise InvalidArgument(name, f"{name} must be one of {choices}, got {value!r}")
    return value
