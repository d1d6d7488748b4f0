"""The driver's settings: one frozen object built once (by the CLI) and passed down."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

DEFAULT_SCHEMA = "kernel"

# The schema name is spliced into SQL text and role names (NAME_owner, ...), so only plain
# lowercase identifiers are accepted; 41 characters leave room for the longest role suffix
# within Postgres' 63-byte identifier limit.
SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


def check_schema_name(name: str) -> str:
    """Return ``name`` if it is a usable schema name, else raise ValueError saying why."""
    if not SCHEMA_NAME.fullmatch(name):
        raise ValueError(
            f"invalid schema name {name!r}: use a lowercase identifier "
            "(a-z, 0-9, _; not starting with a digit; at most 41 characters)"
        )
    return name


def default_worker_id() -> str:
    """Unique per daemon process: the host and the process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    dsn: str | None = None
    schema: str = DEFAULT_SCHEMA
    worker_id: str = field(default_factory=default_worker_id)

    def __post_init__(self) -> None:
        check_schema_name(self.schema)
