"""Exit codes and the errors that end a command with one (README, "Exit codes").

A leaf module: commands raise these; the CLI group turns the driver's other exceptions into
them. One class per exit code, the code a class attribute, as click's own exceptions do.
"""

from __future__ import annotations

from enum import IntEnum
from typing import IO, Any

import click


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # a check failed: certify, freeze, demo
    USAGE = 2
    MIGRATION_REFUSED = 3
    DATABASE_UNREACHABLE = 4
    KERNEL_REFUSED = 5
    DATABASE_ERROR = 6


class CommandError(click.ClickException):
    """Printed as one ``error: …`` line; ends the command with the class's ``exit_code``."""

    exit_code = ExitCode.DATABASE_ERROR

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


class ChecksFailed(CommandError):
    """A check, the freeze gate or the demo did not pass."""

    exit_code = ExitCode.FAILED


class BadUsage(CommandError):
    exit_code = ExitCode.USAGE


class MigrationRefusedError(CommandError):
    exit_code = ExitCode.MIGRATION_REFUSED


class DatabaseUnreachableError(CommandError):
    exit_code = ExitCode.DATABASE_UNREACHABLE


class KernelRefusedError(CommandError):
    exit_code = ExitCode.KERNEL_REFUSED


class DatabaseError(CommandError):
    exit_code = ExitCode.DATABASE_ERROR
