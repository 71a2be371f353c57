"""Field validators shared by the frozen configs: one wording for every error.

Every error names ``Owner.field``, shows the value and says what is valid, and is typed
(``errors.ConfigError`` / ``errors.ConfigTypeError``) so callers catch by type.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from jaxsplit.errors import ConfigError, ConfigTypeError

__all__ = ["check_real", "check_flag", "check_int"]


def check_real(
    owner: str,
    field: str,
    value: Any,
    *,
    lo: float = 0.0,
    hi: float = math.inf,
    hi_inclusive: bool = False,
) -> float:
    """Validates a finite real number in ``[lo, hi)`` (or ``[lo, hi]``) and returns it as float.

    Raises:
      ConfigTypeError: ``value`` is not a real number (bools are rejected too).
      ConfigError: ``value`` is NaN, infinite or outside the range.

    Example:
      >>> check_real("Relative", "fraction", 0.5, hi=1.0, hi_inclusive=True)
      0.5
      >>> check_real("Relative", "fraction", 2, hi=1.0, hi_inclusive=True)
      Traceback (most recent call last):
      ...
      jaxsplit.errors.ConfigError: Relative.fraction must be a finite number in [0, 1], got 2
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(
            owner,
            field,
            f"{owner}.{field} must be a real number, got {value!r} ({type(value).__name__})",
        )
    v = float(value)
    upper_ok = v <= hi if hi_inclusive else v < hi
    if not math.isfinite(v) or v < lo or not upper_ok:
        bracket = "]" if hi_inclusive else ")"
        raise ConfigError(
            owner,
            field,
            f"{owner}.{field} must be a finite number in [{lo:g}, {hi:g}{bracket}, got {value!r}",
        )
    return v


def check_flag(owner: str, field: str, value: Any) -> bool:
    """Validates a bool.

    Example:
      >>> check_flag("SplitConfig", "strict", 1)
      Traceback (most recent call last):
      ...
      jaxsplit.errors.ConfigTypeError: SplitConfig.strict must be a bool, got 1 (int)
    """
    if not isinstance(value, bool):
        raise ConfigTypeError(
            owner, field, f"{owner}.{field} must be a bool, got {value!r} ({type(value).__name__})"
        )
    return value


def check_int(owner: str, field: str, value: Any, *, lo: int, hi: int) -> int:
    """Validates an int in ``[lo, hi]`` and returns it.

    Example:
      >>> check_int("Auto", "candidates", 1, lo=2, hi=1024)
      Traceback (most recent call last):
      ...
      jaxsplit.errors.ConfigError: Auto.candidates must be an int in [2, 1024], got 1
    """
    msg = f"{owner}.{field} must be an int in [{lo}, {hi}], got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigTypeError(owner, field, msg)
    if not lo <= value <= hi:
        raise ConfigError(owner, field, msg)
    return int(value)
