"""Declarative checks for adapter settings (the `provider_configs.settings` JSON object).

An adapter declares `settings_schema = {"port": Setting(tcp_port, required=True), ...}`; the base class
turns it into readable problems and fills in defaults.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any
from urllib.parse import urlsplit

# A kind checks one value and returns what is wrong with it ("must be ..."), or None.
Kind = Callable[[Any], str | None]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def tcp_port(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535
    return None if ok else "must be an integer from 1 to 65535"


def positive_number(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else "must be a number greater than 0"


def non_negative_number(value: Any) -> str | None:
    return None if _is_number(value) and value >= 0 else "must be a number, 0 or more"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def env_name(value: Any) -> str | None:
    ok = isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value)
    return None if ok else "must be the name of an environment variable (letters, digits, _)"


def email_address(value: Any) -> str | None:
    ok = isinstance(value, str) and "@" in parseaddr(value)[1]
    return None if ok else "must be an e-mail address such as news@example.com"


def http_url(value: Any) -> str | None:
    parts = urlsplit(value) if isinstance(value, str) else None
    ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
    return None if ok else "must be an http:// or https:// URL"


@dataclass(frozen=True)
class Setting:
    kind: Kind
    required: bool = False
    default: Any = None


def check_settings(
    adapter_name: str, settings: Mapping[str, Any], schema: Mapping[str, Setting]
) -> list[str]:
    problems = []
    for key, setting in schema.items():
        if key not in settings or settings[key] is None:
            if setting.required:
                problems.append(f"{adapter_name} setting '{key}' is required")
            continue
        problem = setting.kind(settings[key])
        if problem is None:
            continue
        # the name of an environment variable is echoed nowhere: a secret pasted there by mistake
        shown = "" if setting.kind is env_name else f", got {settings[key]!r}"
        problems.append(f"{adapter_name} setting '{key}' {problem}{shown}")
    return problems


def with_defaults(settings: Mapping[str, Any], schema: Mapping[str, Setting]) -> dict[str, Any]:
    """The schema's keys, each with its value from `settings` or its default."""
    return {
        key: settings[key] if settings.get(key) is not None else setting.default
        for key, setting in schema.items()
    }
