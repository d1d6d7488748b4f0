"""Crash recovery with real processes: SIGKILL, SIGSTOP past the lease, SIGTERM."""

from __future__ import annotations

import os
import random
import signal
import time

from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from kernel_driver.testing.sinks import SmtpSink, VoiceSink
from tests.integration.daemon import in_flight_ids, item_counts, run_status, run_until_idle, start_daemon, wait_until

KILLS = 10


def sent_count(conn, run_id) -> int:
    return item_counts(conn, [run_id]).get("sent", 0)


def daemon_backends(conn) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    ).fetchone()[0]


def test_sigkill_ten_times_never_sends_twice(conn, db_dsn, kernel_schema):
    rng = random.Random(int(os.environ.get("KERNEL_TEST_SEED", "0")) or None)
    with SmtpSink() as sink:
        # Large enough that ten kills land before the end even on a fast machine.
        seeded = seed_campaign(conn, kernel_schema, contacts=5000, provider="smtp",
                               settings=sink.provider_settings(), unsubscribed_every=20)
        run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id, 250)
        in_flight_at_kills: set[object] = set()
        kills = 0
        while kills < KILLS:
            daemon = start_daemon(db_dsn, kernel_schema, "--concurrency", "8", "--lease-seconds", "1")
            before = sent_count(conn, run_id)
            # Kill at a random moment once this daemon is sending.
            wait_until(lambda: sent_count(conn, run_id) > before or daemon.poll() is not None,  # noqa: B023 - waited on here
                       timeout=60)
            time.sleep(rng.uniform(0, 0.3))
            assert daemon.poll() is None, "the campaign finished before ten kills: make it larger"
            daemon.kill()
            kills += 1
            # A statement the daemon sent just before it died still runs (and commits) on the
            # server: count what it dispatched once its backends are gone.
            wait_until(lambda: not daemon_backends(conn), timeout=30)
            in_flight_at_kills |= in_flight_ids(conn, run_id)
        run_until_idle(db_dsn, kernel_schema, "--lease-seconds", "1")

        received = sink.count_by_recipient()
    counts = item_counts(conn, [run_id])
    assert max(received.values()) == 1, "a contact received two messages"
    assert counts.get("pending", 0) == 0
    # Only items in flight at a kill may end unknown; at most `concurrency` per kill.
    unknown = {row[0] for row in conn.execute(
        "SELECT id FROM channel_outbox WHERE run_id = %s AND status = 'unknown'", (run_id,))}
    assert unknown <= in_flight_at_kills
    assert len(in_flight_at_kills) <= 8 * KILLS
    assert counts["sent"] + counts.get("unknown", 0) == seeded.reachable
    assert counts.get("failed", 0) == 0
    assert run_status(conn, run_id) in ("completed", "partial")
    # Everything recorded sent really arrived; unknown items arrived at most once.
    sent_recipients = {row[0] for row in conn.execute(
        "SELECT recipient FROM channel_outbox WHERE run_id = %s AND status = 'sent'", (run_id,))}
    assert sent_recipients <= set(received)


def test_sigkill_with_two_steps_in_flight_keeps_the_window(conn, db_dsn, kernel_schema):
    """At --concurrency 256 the daemon keeps two worker_step calls in flight (the window is
    shared at 128 or more): a kill at any moment still leaves at most 256 items of its jobs
    dispatched and unrecorded, counting what a step sent just before the kill committed. (Items
    an earlier daemon left are another window: the next daemon may start before their leases end.)"""
    concurrency = 256
    seeded = seed_campaign(conn, kernel_schema, contacts=40000, provider="noop", settings={"latency_ms": 20})
    run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id)
    rng = random.Random(int(os.environ.get("KERNEL_TEST_SEED", "0")) or None)
    worst = 0
    for kill in range(5):
        worker = f"window-{kill}"
        daemon = start_daemon(db_dsn, kernel_schema, "--worker-id", worker, "--concurrency", str(concurrency),
                              "--lease-seconds", "1")
        before = sent_count(conn, run_id)
        wait_until(lambda: sent_count(conn, run_id) > before + 2 * concurrency or daemon.poll() is not None,  # noqa: B023 - waited on here
                   timeout=60)
        time.sleep(rng.uniform(0, 0.3))
        assert daemon.poll() is None, "the campaign finished before five kills: make it larger"
        daemon.kill()
        wait_until(lambda: not daemon_backends(conn), timeout=30)
        in_flight = conn.execute(
            "SELECT count(*) FROM channel_outbox AS o INNER JOIN job_queue AS j ON j.id = o.job_id"
            " WHERE o.run_id = %s AND o.status = 'pending' AND o.dispatched_at IS NOT NULL AND j.locked_by = %s",
            (run_id, worker),
        ).fetchone()[0]
        assert in_flight <= concurrency, f"{in_flight} items of {worker} dispatched and unrecorded after a kill"
        worst = max(worst, in_flight)
    assert worst > concurrency // 2, f"the window was never more than half full ({worst}): the test saw no overlap"
    run_until_idle(db_dsn, kernel_schema, "--lease-seconds", "1", "--concurrency", str(concurrency))
    counts = item_counts(conn, [run_id])
    assert counts == {"sent": 40000}, counts  # noop deduplicates: what was in flight went out again


def deploy_voice_campaign(conn, schema, sink, contacts):
    """A deployed voice campaign through `sink`, and the daemon environment holding its token."""
    seeded = seed_campaign(conn, schema, contacts=contacts, channel="voice", provider="twilio",
                           settings=sink.provider_settings())
    run_id = Kernel(conn, schema).deploy_campaign(seeded.campaign_id)
    return run_id, {"VOICE_SINK_AUTH_TOKEN": sink.auth_token}


def test_daemon_frozen_past_its_lease_is_fenced(conn, db_dsn, kernel_schema):
    with VoiceSink() as sink:
        sink.slow_ms = 50
        run_id, env = deploy_voice_campaign(conn, kernel_schema, sink, contacts=200)
        frozen = start_daemon(db_dsn, kernel_schema, "--concurrency", "4", "--lease-seconds", "1",
                              "--worker-id", "frozen", env=env)
        wait_until(lambda: sent_count(conn, run_id) > 10)
        frozen.send_signal(signal.SIGSTOP)
        time.sleep(1.5)  # past the lease
        run_until_idle(db_dsn, kernel_schema, "--lease-seconds", "1", "--worker-id", "successor", env=env)
        assert run_status(conn, run_id) in ("completed", "partial")
        calls_before_resume = len(sink.calls)
        frozen.send_signal(signal.SIGCONT)
        time.sleep(1.0)  # let it wake up, get fenced and go idle
        output = frozen.stop(timeout=30)

        calls = [call.to for call in sink.calls]
    assert frozen.returncode == 0, output
    assert "lease lost" in output
    # The frozen daemon may finish the calls it had in flight, but sends nothing new.
    assert len(calls) - calls_before_resume <= 4
    assert len(calls) == len(set(calls)), "a contact was called twice"
    counts = item_counts(conn, [run_id])
    assert counts.get("pending", 0) == 0
    assert counts["sent"] + counts.get("unknown", 0) == 200
    assert counts.get("unknown", 0) <= 4
    assert conn.execute(
        "SELECT count(*) FROM job_events WHERE run_id = %s AND worker = 'successor' AND to_status = 'completed'",
        (run_id,),
    ).fetchone()[0] == 1


def test_sigterm_drains_releases_and_another_daemon_finishes(conn, db_dsn, kernel_schema):
    with VoiceSink() as sink:
        sink.slow_ms = 20
        run_id, env = deploy_voice_campaign(conn, kernel_schema, sink, contacts=300)
        first = start_daemon(db_dsn, kernel_schema, "--concurrency", "4", "--worker-id", "first", env=env)
        wait_until(lambda: sent_count(conn, run_id) > 20)
        output = first.stop(timeout=30)
        assert first.returncode == 0, output
        assert not in_flight_ids(conn, run_id), "in-flight calls were not recorded before exit"
        assert run_status(conn, run_id) == "running"
        released = conn.execute(
            "SELECT count(*) FROM job_events WHERE run_id = %s AND worker = 'first'"
            " AND from_status = 'processing' AND to_status = 'queued'", (run_id,)).fetchone()[0]
        assert released == 1
        run_until_idle(db_dsn, kernel_schema, "--worker-id", "second", env=env)
        calls = [call.to for call in sink.calls]
    assert len(calls) == len(set(calls)) == 300
    assert item_counts(conn, [run_id]) == {"sent": 300}
    assert run_status(conn, run_id) == "completed"
