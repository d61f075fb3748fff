"""The one exception type users see for bad input.

Every message is one line that starts with the flag or file at fault (``--image_size: must be >= 8``), so
`run.py` can print it without a stack trace and exit non-zero before any work is done.
"""
import re


def first_line(e: BaseException) -> str:
    """The first line of an error message (TF's can run to pages), without TF's op decorations."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\]$", "", text)


class UsageError(ValueError):
    """Bad flag value, missing file or unusable data, explained in one line."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(f"{where}: {message}")


class ArgumentError(ValueError):
    """A library argument out of range, named by its argument name (``image_size: must be >= 8``).

    Raised by the settings sections; `config.py` turns it into a `UsageError` naming the `--flag`.
    """

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        self.message = message
        super().__init__(f"{argument}: {message}")


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf; nothing from that step on was saved."""
