"""Errors that end a command with one clear line.

`BadInput` (exit code 2) covers everything the user can fix by editing the spec, the command line or
the files it points at; it is raised before any work starts wherever possible.
"""

from __future__ import annotations


class BadInput(Exception):
    """The user's input is wrong (bad spec, missing file, unreachable address): exit code 2."""

    exit_code = 2


class SpecError(BadInput):
    """A job spec field is invalid; the message names the field and what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class DivergedError(RuntimeError):
    """A run's loss, weights or outputs became NaN or infinite (exit code 1): the run is marked FAILED."""
