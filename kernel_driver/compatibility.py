"""Which kernels this driver works with, checked by every command that uses the kernel.

Its own version, and any newer one of the same major version: a minor version only adds
(functions keep their signatures and meaning; a new contract is a `_v2` beside the old one;
docs/EXECUTION_KERNEL_FREEZE.md), so the DBA can migrate first and roll the daemons out after.
An older kernel lacks functions this driver calls; a newer major version may have removed some.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
import psycopg

from kernel_driver import __version__, migrate
from kernel_driver.config import Settings
from kernel_driver.db import database


class KernelMismatch(Exception):
    """No kernel in the schema, or one this driver cannot work with."""


def version_tuple(version: str) -> tuple[int, int, int]:
    major, minor, patch = (int(part) for part in version.split("."))
    return major, minor, patch


def check_kernel(found: str | None, schema: str, driver: str = __version__) -> str | None:
    """A warning for a newer kernel this driver works with, None for its own; raises
    KernelMismatch for no kernel, an older one, or another major version."""
    if found is None:
        raise KernelMismatch(f"no kernel in schema {schema}: run kernel-driver migrate first "
                             "(or pass the --schema it was installed into)")
    kernel, ours = version_tuple(found), version_tuple(driver)
    if kernel < ours:
        raise KernelMismatch(f"kernel {found} in schema {schema} is older than this kernel-driver ({driver}), "
                             "which calls functions it lacks: run kernel-driver migrate first")
    if kernel[0] != ours[0]:
        raise KernelMismatch(f"kernel {found} in schema {schema} is a new major version, which this kernel-driver "
                             f"({driver}) does not work with: install kernel-driver {kernel[0]}.x")
    if kernel > ours:
        return (f"kernel {found} in schema {schema} is newer than this kernel-driver ({driver}): it keeps every "
                f"{ours[0]}.x function this driver calls; upgrade the driver to use what {found} adds")
    return None


def require_kernel(conn: psycopg.Connection, schema: str) -> str:
    """The kernel's version; refuses one this driver does not work with, and names a newer one
    in a warning on stderr."""
    found = migrate.kernel_version(conn, schema)
    warning = check_kernel(found, schema)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    assert found is not None
    return found


@contextmanager
def kernel_database(settings: Settings) -> Iterator[psycopg.Connection]:
    """A command's connection to a database whose kernel this driver works with."""
    with database(settings) as conn:
        require_kernel(conn, settings.schema)
        yield conn
