"""Q2 crash recovery: a daemon is killed with calls in flight; nothing is re-sent, every item ends."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kernel_driver.certify.harness import (
    SLOW_PROVIDER_MS,
    Certification,
    keys_received,
    sink_environment,
)
from kernel_driver.certify.records import CheckRecord, expect
from kernel_driver.testing.sinks import SmtpSink, VoiceSink, WebhookSink

Q2_CONTACTS = 6
Q2_CONCURRENCY = 2  # provider calls in flight at once: the most items the kill can leave unknown


@dataclass(frozen=True)
class CrashScenario:
    provider: str
    channel: str
    sink: Callable[[], SmtpSink | VoiceSink | WebhookSink]
    in_flight_ends: str  # the status an item in flight at the kill must end with


CRASH_SCENARIOS = (
    CrashScenario("twilio", "voice", VoiceSink, "unknown"),  # does not deduplicate: never re-sent
    CrashScenario("webhook", "email", WebhookSink, "sent"),  # deduplicates by key: re-sent once
)


def dispatched_pending(cert: Certification, run_id: str) -> dict[str, str]:
    """Items handed to the provider whose outcome is not recorded: item id -> idempotency key."""
    rows = cert.rows(
        "SELECT id::text, idempotency_key FROM {schema}.channel_outbox"
        " WHERE run_id = %s AND status = 'pending' AND dispatched_at IS NOT NULL",
        run_id,
    )
    return {row["id"]: row["idempotency_key"] for row in rows}


def calls_in_flight(cert: Certification, run_id: str, sink: Any) -> list[str]:
    """Dispatched, unrecorded items whose request the provider has already received."""
    received = keys_received(sink)
    return [item_id for item_id, key in dispatched_pending(cert, run_id).items() if key in received]


def crash_and_recover(cert: Certification, record: CheckRecord, scenario: CrashScenario) -> dict[str, Any]:
    """SIGKILL a daemon while provider calls are in flight, restart one, check every item."""
    with scenario.sink() as sink:
        sink.slow_ms = SLOW_PROVIDER_MS
        env = sink_environment(sink)
        campaign = cert.campaign(record, scenario.channel, scenario.provider, sink.provider_settings(), Q2_CONTACTS)
        run_id = cert.deploy(record, campaign, batch_size=Q2_CONTACTS)
        victim = cert.start_daemon(record, f"q2-{scenario.provider}-1", "--concurrency", str(Q2_CONCURRENCY), env=env)
        cert.wait_until("a provider call in flight", lambda: calls_in_flight(cert, run_id, sink))
        victim.kill()
        killed_at = time.monotonic()
        in_flight = dispatched_pending(cert, run_id)  # the daemon is dead: this is final
        sink.slow_ms = 0
        successor = cert.run_daemon_until_idle(record, f"q2-{scenario.provider}-2", env=env)
        status = cert.wait_for_runs([run_id])[run_id]
        recovery_s = time.monotonic() - killed_at
        received = keys_received(sink)
        delivery_ids = {key: d.id for key, d in sink.deliveries_by_key.items()} if isinstance(sink, WebhookSink) else {}
        resent = sink.duplicate_attempts if isinstance(sink, WebhookSink) else 0

    items = {item["id"]: item for item in cert.items(run_id)}
    reclaimed = cert.claims_by_worker([run_id]).get(successor.worker_id, 0)
    outcome: dict[str, Any] = {
        "provider": scenario.provider,
        "run_id": run_id,
        "run_status": status,
        "items": len(items),
        "in_flight_at_kill": len(in_flight),
        "in_flight_item_ids": sorted(in_flight),
        "in_flight_final_statuses": dict(Counter(items[i]["status"] for i in in_flight)),
        "item_statuses": dict(Counter(item["status"] for item in items.values())),
        "max_provider_calls_per_key": max(received.values(), default=0),
        "resent_and_deduplicated_by_provider": resent,
        "recovery_s": round(recovery_s, 3),
    }
    where = f"{scenario.provider} run {run_id}"
    expect(in_flight, f"{where}: no item was in flight when the daemon was killed")
    expect(
        len(in_flight) <= Q2_CONCURRENCY,
        f"{where}: {len(in_flight)} items were in flight, more than the daemon's concurrency {Q2_CONCURRENCY}",
    )
    expect(reclaimed, f"{where}: the restarted daemon did not claim the killed daemon's job")
    expect(
        outcome["in_flight_final_statuses"] == {scenario.in_flight_ends: len(in_flight)},
        f"{where}: items in flight at the kill ended {outcome['in_flight_final_statuses']},"
        f" expected all {scenario.in_flight_ends}",
    )
    others = {i: item["status"] for i, item in items.items() if i not in in_flight and item["status"] != "sent"}
    expect(not others, f"{where}: items not in flight at the kill did not end sent: {others}")
    expect(
        outcome["max_provider_calls_per_key"] <= 1,
        f"{where}: the provider acted on a key more than once: {dict(received)}",
    )
    for item_id, key in in_flight.items():
        if key in delivery_ids:
            expect(
                items[item_id]["provider_message_id"] == delivery_ids[key],
                f"{where}: item {item_id} recorded {items[item_id]['provider_message_id']},"
                f" not the provider's first delivery {delivery_ids[key]}",
            )
    return outcome


def check_crash_recovery(cert: Certification, record: CheckRecord) -> None:
    record.measurements["scenarios"] = [crash_and_recover(cert, record, s) for s in CRASH_SCENARIOS]
