"""Typed exceptions: callers (the CLI among them) catch by type, never by message text.

Every class subclasses ``ValueError`` or ``TypeError``, so code written against the
plain built-ins keeps working. Messages name the argument, show the value and say what
is valid; the attributes carry the same facts for programs.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "UnmatchedPatternError",
    "BadLayerError",
    "AlreadySplitError",
    "NonFiniteError",
    "UnsplittableError",
    "CalibrationError",
]


class ConfigError(ValueError):
    """A configuration field holds a value outside its valid range or set.

    Attributes:
      owner: the config class (``"SplitConfig"``, ``"Auto"``, ``"Relative"`` ...).
      field: the field's name (``"method"``).

    Example:
      >>> e = ConfigError("SplitConfig", "method", "SplitConfig.method must be ...")
      >>> isinstance(e, ValueError), e.field
      (True, 'method')
    """

    def __init__(self, owner: str, field: str, message: str):
        super().__init__(message)
        self.owner = owner
        self.field = field


class ConfigTypeError(TypeError):
    """A configuration field holds a value of the wrong type (see ``ConfigError``).

    Example:
      >>> isinstance(ConfigTypeError("Auto", "spec", "Auto.spec must be ..."), TypeError)
      True
    """

    def __init__(self, owner: str, field: str, message: str):
        super().__init__(message)
        self.owner = owner
        self.field = field


class UnmatchedPatternError(ValueError):
    """Layer pattern(s) matched no layer of the tree.

    Attributes:
      patterns: the patterns that matched nothing.
      available: every layer path of the tree.

    Example:
      >>> e = UnmatchedPatternError(["x"], ["Dense_0"])
      >>> e.patterns, e.available
      (('x',), ('Dense_0',))
    """

    def __init__(self, patterns: Sequence[str], available: Sequence[str], what: str = "layers"):
        self.patterns = tuple(patterns)
        self.available = tuple(available)
        listed = list(self.available) or "(none: the tree holds no weight)"
        super().__init__(
            f"SplitConfig.{what} pattern(s) {list(self.patterns)} matched no layer; "
            f"available layer paths: {listed}"
        )


class BadLayerError(ValueError):
    """A selected layer cannot be processed as asked (base of the layer errors).

    Attributes:
      path: the layer's path.

    Example:
      >>> BadLayerError("Dense_0", "layer 'Dense_0': ...").path
      'Dense_0'
    """

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


class AlreadySplitError(BadLayerError):
    """A selected layer is already split (merge it first).

    Example:
      >>> issubclass(AlreadySplitError, ValueError)
      True
    """


class NonFiniteError(BadLayerError):
    """A selected layer holds NaN/inf and ``allow_nonfinite`` is off.

    Example:
      >>> issubclass(NonFiniteError, BadLayerError)
      True
      >>> str(NonFiniteError.count("d", "kernel", 2))  # doctest: +ELLIPSIS
      "layer 'd': kernel holds 2 non-finite value(s) (NaN/inf); pass allow_nonfinite=True ..."
    """

    @classmethod
    def count(cls, path: str, weight: str, n_bad: int) -> NonFiniteError:
        """The error for ``n_bad`` non-finite values in layer ``path``'s ``weight``."""
        return cls(
            path,
            f"layer {path!r}: {weight} holds {n_bad} non-finite value(s) (NaN/inf); pass "
            f"allow_nonfinite=True to keep them on branch_0",
        )


class UnsplittableError(TypeError):
    """A selected layer's weight is not floating point.

    Attributes:
      path: the layer's path.

    Example:
      >>> UnsplittableError("emb", "layer 'emb': ...").path
      'emb'
    """

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


class CalibrationError(BadLayerError):
    """A ``calibration`` entry does not fit its layer (wrong shape, unknown path).

    Example:
      >>> issubclass(CalibrationError, ValueError), CalibrationError("d", "...").path
      (True, 'd')
    """
