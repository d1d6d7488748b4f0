"""Who may use the console: tokens given when it starts, each one an admin's or one tenant's.

An admin token sees every tenant (requests run as SCHEMA_operator); a tenant token sees only its
tenant (requests run as SCHEMA_reader, or SCHEMA_app for a change, scoped to that tenant), so
row-level security decides what a page can show. A token is compared in constant time, and
only its SHA-256 is kept in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MIN_TOKEN_LENGTH = 16  # shorter ones could be guessed; `secrets.token_urlsafe()` gives 43


@dataclass(frozen=True)
class Access:
    """What a token lets its holder see: every tenant (admin) or one."""

    tenant_id: uuid.UUID | None

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    def __init__(self, grants: Iterable[tuple[str, Access]]) -> None:
        self._grants = [(digest(token), access) for token, access in grants]
        if not self._grants:
            raise ValueError("the console needs at least one token")

    def access(self, token: str | None) -> Access | None:
        """The access a token grants; None for a missing or unknown one."""
        if not token:
            return None
        given = digest(token)
        found = None
        for known, access in self._grants:  # every one compared: no early exit to time
            if hmac.compare_digest(known, given):
                found = access
        return found


def generated_admin_token() -> str:
    return secrets.token_urlsafe(32)


def parse_tokens(path: Path) -> list[tuple[str, Access]]:
    """A tokens file: one `admin TOKEN` or `tenant TENANT_UUID TOKEN` per line; `#` starts a
    comment. Raises ValueError naming the line that is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the tokens file {path}: {exc.strerror}") from None
    grants: list[tuple[str, Access]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{path}, line {number}"
        if words[0] == "admin" and len(words) == 2:
            token, access = words[1], Access(None)
        elif words[0] == "tenant" and len(words) == 3:
            try:
                tenant_id = uuid.UUID(words[1])
            except ValueError:
                raise ValueError(f"{where}: {words[1]!r} is not a tenant uuid") from None
            token, access = words[2], Access(tenant_id)
        else:
            raise ValueError(f"{where}: write `admin TOKEN` or `tenant TENANT_UUID TOKEN`")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"{where}: the token is shorter than {MIN_TOKEN_LENGTH} characters"
                             " (make one with: python3 -c 'import secrets; print(secrets.token_urlsafe())')")
        grants.append((token, access))
    if not grants:
        raise ValueError(f"{path} holds no token")
    if len({digest(token) for token, _ in grants}) != len(grants):
        raise ValueError(f"{path}: a token appears twice; give every tenant a token of its own")
    return grants
