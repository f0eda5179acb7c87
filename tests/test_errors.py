"""qcompile.errors: the one-line messages the CLI prints."""

from qcompile.errors import first_line


def test_first_line_keeps_the_line_a_colon_introduces():
    """Library errors that open with a heading line ("...: ") keep the line that says what went wrong."""
    e = RuntimeError("Error(s) in loading state_dict for Linear:\n\tsize mismatch for weight: [64, 32] vs [64, 64].")
    assert first_line(e) == "Error(s) in loading state_dict for Linear: size mismatch for weight: [64, 32] vs [64, 64]."
    assert first_line(ValueError("first\nsecond")) == "first" and first_line(ValueError("")) == "ValueError"
