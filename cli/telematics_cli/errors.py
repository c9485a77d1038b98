"""Exit codes and the one exception type that ends a command with a clear message (no stack trace)."""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
"""Everything asked for was done."""
EXIT_DATA: Final = 1
"""The command ran, but the data had problems: invalid rows, entries SQS refused, no such user, no token."""
EXIT_USAGE: Final = 2
"""The command could not run: bad options, no stack found, unreadable file, missing or expired credentials."""
EXIT_INTERRUPTED: Final = 130


class CliError(Exception):
    """A problem to tell the operator in one message, then exit with ``exit_code``."""

    def __init__(self, message: str, *, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class DataError(CliError):
    """The data (a file, a user, a token) is at fault, not the command line or the configuration."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=EXIT_DATA)
