"""The run-time switches read from the environment (the README's table), each parsed one way."""

import os


def positive_int(variable: str, meaning: str) -> int | None:
    """The environment's ``variable`` as a positive integer, or None where it is unset; anything
    else is a ValueError that names it and says what it sets (``meaning``)."""
    text = os.environ.get(variable)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{variable} must be a positive integer ({meaning}), got {text!r}")
    return value
