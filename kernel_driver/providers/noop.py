"""The noop adapter: accepts every item and sends nothing. For benchmarks and demos only."""

from __future__ import annotations

import time
from collections.abc import Callable

from kernel_driver.providers.base import OutboundItem, ProviderAdapter, SendResult, key_digest
from kernel_driver.providers.settings import Setting, non_negative_number


class NoopAdapter(ProviderAdapter):
    """Accepts instantly (or after `latency_ms`) with the id `noop-<sha256 of the key>`.

    Nothing leaves the process, so re-sending a key is harmless: it "deduplicates".
    """

    name = "noop"
    channels = frozenset({"email", "voice"})
    deduplicates = True
    settings_schema = {"latency_ms": Setting(non_negative_number, default=0)}

    def send_later(self, item: OutboundItem, done: Callable[[SendResult], None]) -> bool:
        """Without latency_ms the answer is known at once: given to `done` here, in the caller's
        thread, as an in-process job of graphile-worker or pg-boss runs (no thread hand-over)."""
        if self.settings["latency_ms"]:
            return False  # it sleeps: the daemon's provider threads wait for it
        done(self.send(item))
        return True

    def deliver(self, item: OutboundItem) -> SendResult:
        if self.settings["latency_ms"]:
            time.sleep(self.settings["latency_ms"] / 1000)
        return SendResult.accepted(f"noop-{key_digest(item.idempotency_key)}", {"noop": True})
