"""User-facing errors.

Anything the user can fix (a bad path, a corrupt file, an impossible recipe) raises ``QCompileError`` with one
sentence naming the problem; the CLI prints it and exits non-zero without a traceback.
"""


class QCompileError(Exception):
    """An error caused by the user's input, reported as one clear message."""


class UnsupportedModelError(QCompileError):
    """The model's architecture has no adapter."""


class RecipeError(QCompileError):
    """A recipe is malformed or asks for something impossible."""
