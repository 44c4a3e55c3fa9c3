"""The one exception type for mistakes a user can fix (bad file, field, override or checkpoint)."""


class UserError(Exception):
    """A one-line message naming the file, the item and what was expected. run.py prints it without a traceback."""
