"""The provider adapter contract: what the daemon hands an adapter and what it gets back.

An adapter makes one provider call per outbox item and classifies what happened into one of
four outcomes. The daemon turns the outcome into the item's outbox status (`outbox_outcome`);
see docs/providers.md.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import entry_points
from typing import Any, ClassVar

from kernel_driver.providers.settings import Setting, check_settings, with_defaults

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kernel_driver.providers"
CHANNELS = frozenset({"email", "voice"})
DEFAULT_CONCURRENCY = 8  # the daemon's default --concurrency


class ProviderConfigError(Exception):
    """Settings or environment that an adapter cannot work with; the message says what to fix."""


class Outcome(StrEnum):
    ACCEPTED = "accepted"  # the provider took the item: it has a message id
    REJECTED = "rejected"  # permanent failure: sending it again would fail again
    NOT_SENT = "not_sent"  # transient failure, certainly not delivered: safe to retry
    AMBIGUOUS = "ambiguous"  # the request may have reached the provider: outcome unknowable


@dataclass(frozen=True)
class OutboundItem:
    """One outbox row as the adapter sees it.

    content for "email": {"subject", "text", optional "html"}; for "voice": {"from", "script"}.
    """

    id: str
    idempotency_key: str
    channel: str
    recipient: str
    content: Mapping[str, Any]
    run_id: str
    contact_id: str


@dataclass(frozen=True)
class SendResult:
    """What one provider call came to. `response` is JSON-serialisable and never holds a secret."""

    outcome: Outcome
    provider_message_id: str | None = None
    response: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def accepted(cls, provider_message_id: str | None, response: dict[str, Any]) -> SendResult:
        return cls(Outcome.ACCEPTED, provider_message_id, response)

    @classmethod
    def failed(cls, outcome: Outcome, error: str, response: dict[str, Any] | None = None) -> SendResult:
        return cls(outcome, None, response or {}, error)


def key_digest(idempotency_key: str) -> str:
    """A short stable digest of an idempotency key, for ids that must not depend on its format."""
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


def describe_error(exc: BaseException) -> str:
    """An exception as one line for SendResult.error: its type, and its message when it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def outbox_outcome(outcome: Outcome, deduplicates: bool) -> str:
    """The `outcome` value for record_outbox_results: "sent", "failed", "retry" or "unknown".

    An ambiguous item is re-sent (with the same key) only through a provider that deduplicates
    by key; otherwise it ends `unknown`, because re-sending could deliver it twice.
    """
    if outcome is Outcome.ACCEPTED:
        return "sent"
    if outcome is Outcome.REJECTED:
        return "failed"
    if outcome is Outcome.NOT_SENT or deduplicates:
        return "retry"
    return "unknown"


class ProviderAdapter(ABC):
    """Base of every adapter. Subclasses declare their settings and implement `deliver`.

    The daemon calls `send` from up to `concurrency` threads at once on one instance, so
    `deliver` must be thread-safe; an adapter that keeps connections sizes its pool to
    `self.concurrency` (the daemon's `--concurrency`).
    """

    name: ClassVar[str]
    channels: ClassVar[frozenset[str]]
    # True only if the provider drops a second request with the same idempotency key, so that
    # an AMBIGUOUS item may be re-sent with that key without risking a second delivery.
    deduplicates: ClassVar[bool] = False
    settings_schema: ClassVar[Mapping[str, Setting]] = {}

    @classmethod
    def validate_settings(cls, settings: Mapping[str, Any]) -> list[str]:
        """Human-readable problems with `settings`; empty when they are valid.

        Keys the schema does not name are ignored: provider_configs.settings may carry keys
        meant for the kernel rather than the adapter.
        """
        if not isinstance(settings, Mapping):
            return [f"{cls.name} settings must be a JSON object, got {type(settings).__name__}"]
        return check_settings(cls.name, settings, cls.settings_schema)

    def __init__(
        self,
        settings: Mapping[str, Any],
        environ: Mapping[str, str] = os.environ,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        problems = self.validate_settings(settings)
        if problems:
            raise ProviderConfigError(f"invalid {self.name} settings: " + "; ".join(problems))
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ProviderConfigError(f"{self.name}: concurrency must be an integer of 1 or more, got {concurrency!r}")
        self.settings: dict[str, Any] = with_defaults(settings, self.settings_schema)
        self.concurrency = concurrency
        self._environ = environ
        self.prepare()

    def prepare(self) -> None:
        """Set up what every send shares (secrets, a connection pool sized to `concurrency`),
        once `settings` hold their defaults. Raise ProviderConfigError when it cannot be."""

    def secret(self, setting_key: str) -> str | None:
        """The secret in the environment variable that setting `setting_key` names (None if unset)."""
        variable = self.settings.get(setting_key)
        if variable is None:
            return None
        value = self._environ.get(variable)
        if not value:
            raise ProviderConfigError(
                f"{self.name}: environment variable {variable} (named by setting '{setting_key}') "
                "is not set or empty"
            )
        return value

    def send(self, item: OutboundItem) -> SendResult:
        """Make the provider call for `item` and classify it. Never raises."""
        refused = self.refused(item)
        if refused is not None:
            return refused
        try:
            return self.deliver(item)
        except Exception as exc:
            return self.adapter_error(item, exc)

    def send_later(self, item: OutboundItem, done: Callable[[SendResult], None]) -> bool:
        """Start the provider call for `item` and return True: `done` gets its result, classified
        as by send() (never an exception), from a thread of the adapter's once it is known.

        False, the default: the adapter has no such path; call send(), which blocks (the daemon
        calls it from its provider threads). HTTP adapters start their calls on an event loop.
        """
        return False

    def refused(self, item: OutboundItem) -> SendResult | None:
        """The result for an item this adapter cannot serve (its channel), before any call."""
        if item.channel in self.channels:
            return None
        return SendResult.failed(
            Outcome.REJECTED,
            f"provider {self.name} does not serve channel {item.channel!r} "
            f"(it serves {', '.join(sorted(self.channels))})",
        )

    def adapter_error(self, item: OutboundItem, exc: Exception) -> SendResult:
        """An adapter bug: we cannot tell whether the request left."""
        log.error("provider %s failed unexpectedly", self.name, extra={"item_id": item.id}, exc_info=exc)
        return SendResult.failed(Outcome.AMBIGUOUS, f"adapter error: {describe_error(exc)}")

    @abstractmethod
    def deliver(self, item: OutboundItem) -> SendResult:
        """One provider call for `item`, whose channel is one of `channels`.

        Classify provider and network trouble into an outcome instead of raising it.
        """

    def close(self) -> None:
        """Release connections. The adapter is not used after this."""

    def __enter__(self) -> ProviderAdapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # settings never hold secrets (only the names of the variables that do)
        return f"{type(self).__name__}({self.settings!r})"


def installed_providers() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_adapter(name: str) -> type[ProviderAdapter]:
    """The adapter class registered under `name` in the `kernel_driver.providers` entry points."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        installed = ", ".join(sorted(found)) or "none"
        raise ProviderConfigError(f"unknown provider {name!r}; installed providers: {installed}")
    try:
        adapter = found[name].load()
    except Exception as exc:
        raise ProviderConfigError(f"provider {name!r} ({found[name].value}) cannot be loaded: {exc}") from exc
    if not (isinstance(adapter, type) and issubclass(adapter, ProviderAdapter)):
        raise ProviderConfigError(
            f"provider {name!r} ({found[name].value}) is not a ProviderAdapter subclass"
        )
    return adapter


def open_adapter(
    name: str,
    settings: Mapping[str, Any],
    *,
    concurrency: int,
    environ: Mapping[str, str] = os.environ,
) -> ProviderAdapter:
    """An instance of the adapter registered under `name`, told the daemon's concurrency.

    An adapter whose own __init__ predates the `concurrency` keyword is built without it (it
    keeps the default), so that adapters written for kernel 1.0 go on working.
    """
    adapter_class = load_adapter(name)
    parameters = inspect.signature(adapter_class).parameters.values()
    if any(p.name == "concurrency" or p.kind is p.VAR_KEYWORD for p in parameters):
        return adapter_class(settings, environ, concurrency=concurrency)
    return adapter_class(settings, environ)
