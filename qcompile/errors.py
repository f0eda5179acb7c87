"""User-facing errors.

Anything the user can fix (a bad path, a corrupt file, an impossible recipe) raises ``QCompileError`` with one
sentence naming the problem; the CLI prints it and exits non-zero without a traceback.
"""

import math


class QCompileError(Exception):
    """An error caused by the user's input, reported as one clear message."""


class UnsupportedModelError(QCompileError):
    """The model's architecture has no adapter."""


class RecipeError(QCompileError):
    """A recipe is malformed or asks for something impossible."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run long), or its type when it has none; a
    first line that only introduces the next (ends with ':', e.g. torch's "Error(s) in loading state_dict for
    Linear:") brings that one with it."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def require_int(value, name: str, minimum: int = 0) -> None:
    """Refuse ``value`` unless it is an integer >= ``minimum`` (0: non-negative, 1: positive); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {0: "non-negative", 1: "positive"}.get(minimum, f">= {minimum}")
        raise RecipeError(f"{name} must be a {kind} integer, got {value!r}")


def require_number(value, name: str, positive: bool = True) -> None:
    """Refuse ``value`` unless it is a finite number > 0 (``positive``) or >= 0; bools, NaN and infinities are
    refused."""
    # the type first: comparing a string with 0 would raise TypeError instead of this message; NaN compares False
    # with everything, so "not < 0" alone would let it through
    # (isfinite only on floats: it raises OverflowError on ints too large for a float, which are finite anyway)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value)) or (value <= 0 if positive else value < 0)):
        raise RecipeError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, got {value!r}")
