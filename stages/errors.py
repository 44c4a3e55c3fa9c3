"""The one exception type for mistakes a user can fix (bad file, field, override or checkpoint)."""

from __future__ import annotations


class UserError(Exception):
    """A one-line message naming the file, the item and what was expected. run.py prints it without a traceback."""


def one_line(err: UserError) -> str:
    """The message of `err` on one line. A DataLoader worker re-raises a UserError with the worker's traceback
    in its message; the original message is that traceback's last line."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[-1].removeprefix(f"{UserError.__module__}.{UserError.__qualname__}: ")
