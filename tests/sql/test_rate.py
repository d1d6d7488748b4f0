"""take_rate_tokens: a token bucket per workspace and provider, shared by every session."""

from __future__ import annotations

import time
import uuid

from tests.sql.helpers import in_threads, scalar, seed_campaign


def take(conn, workspace, wanted, provider="smtp"):
    return scalar(conn, "SELECT take_rate_tokens(%s, %s, %s)", [workspace, provider, wanted])


def test_without_a_rate_every_send_may_start(conn):
    seed = seed_campaign(conn, 1)
    assert take(conn, seed.workspace_id, 1000) == 1000
    assert take(conn, uuid.uuid4(), 7) == 7
    assert take(conn, seed.workspace_id, 0) == 0


def test_the_burst_is_one_second_of_tokens_and_is_shared(conn, connect):
    seed = seed_campaign(conn, 1, max_per_second=5)
    other = connect()
    assert take(conn, seed.workspace_id, 3) == 3
    # The other session drains the same bucket: 2 left (3 if a slow server let 0.2 s pass),
    # where a bucket of its own would give it 5.
    assert take(other, seed.workspace_id, 10) in (2, 3)
    assert take(conn, seed.workspace_id, 10) <= 1
    assert take(other, seed.workspace_id, 10, provider="twilio") == 10  # another bucket: unlimited


def test_two_sessions_together_get_about_the_rate_over_a_second(conn, connect):
    seed = seed_campaign(conn, 1, max_per_second=5)
    sessions = [connect(), connect()]

    def hammer(i):
        granted, deadline = 0, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            granted += take(sessions[i], seed.workspace_id, 1)
            time.sleep(0.01)
        return granted

    started = time.monotonic()
    grants = in_threads(2, hammer)
    elapsed = time.monotonic() - started  # a little over a second (more on a busy machine)
    assert all(isinstance(g, int) for g in grants), grants
    # a burst of 5, then 5 per second: about 10 in one second, never more than the rate allows
    assert 5 <= sum(grants) <= 5 + 5 * elapsed + 1, (grants, elapsed)
    assert sum(grants) >= 8, grants  # the bucket refills while they wait
    assert scalar(conn, "SELECT count(*) FROM rate_buckets") == 1


def test_the_bucket_refills_at_the_rate(conn):
    seed = seed_campaign(conn, 1, max_per_second=20)
    assert take(conn, seed.workspace_id, 100) == 20
    started = time.monotonic()
    time.sleep(0.25)
    refilled = take(conn, seed.workspace_id, 100)
    elapsed = time.monotonic() - started
    assert 4 <= refilled <= 20 * elapsed + 1, (refilled, elapsed)
