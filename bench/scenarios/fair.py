"""Fair claims (issue 10): tenant A's large campaign alone, then again with five other tenants
each deploying a one-contact campaign while A's backlog is being sent. Each small campaign's
deploy → completed (the database's clock), and A's throughput with them against alone."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from bench.pg import (
    SCHEMA,
    BenchError,
    analyze_host_tables,
    deploy,
    kernel_database,
    scalar,
    start_daemon,
    verify_items,
)
from kernel_driver.testing.seed import seed_campaign

OTHERS = 5
EVERY_S = 0.3  # between the other tenants' deploys


def one(ctx: Any, contacts: int, others: int) -> dict[str, Any]:
    label = f"fair{others}"
    with kernel_database(ctx.server_dsn, label) as (dsn, conn):
        big = seed_campaign(conn, SCHEMA, contacts=contacts, provider="noop")
        small = [seed_campaign(conn, SCHEMA, contacts=1, provider="noop") for _ in range(others)]
        analyze_host_tables(conn)
        big_run = deploy(conn, big.campaign_id)
        # Not --until-idle: A's backlog may be sent before the last other tenant deploys.
        daemon = start_daemon(dsn, f"{label}-0", ctx.sizes.concurrency, ctx.log_dir, until_idle=False)
        small_runs = []
        if others:
            # A's backlog is being sent: the daemon is busy with it, most of it still queued.
            wait_until_dispatched(conn, big_run, min(contacts // 20, 20_000))
            for campaign in small:
                small_runs.append(deploy(conn, campaign.campaign_id))
                time.sleep(EVERY_S)
        wait_until_completed(conn, [big_run, *small_runs])
        daemon.stop()
        if daemon.exit_code != 0:
            raise BenchError(f"the daemon exited {daemon.exit_code}; its log: {daemon.log}")
        verified = verify_items(conn, [big_run], contacts)
        big_wall = scalar(conn, "SELECT extract(epoch FROM completed_at - started_at)::float8"
                                " FROM kernel.campaign_runs WHERE id = %s", (big_run,))
        waits = [scalar(conn, "SELECT extract(epoch FROM completed_at - created_at)::float8"
                              " FROM kernel.campaign_runs WHERE id = %s AND status = 'completed'", (run,))
                 for run in small_runs]
        small_after_big = scalar(conn, "SELECT count(*) FROM kernel.campaign_runs AS s, kernel.campaign_runs AS b"
                                      " WHERE s.id = ANY(%s) AND b.id = %s AND s.completed_at > b.completed_at",
                                (small_runs, big_run))
    if any(w is None for w in waits):
        raise BenchError("a small campaign did not complete")
    return {"n": contacts, "others": others, **verified, "big_wall_s": big_wall, "msgs_per_s": contacts / big_wall,
            "small_deploy_to_completed_s": waits, "small_after_big": small_after_big,
            "peak_rss_mib": daemon.maxrss_kib / 1024}


def wait_until_dispatched(conn: psycopg.Connection, run_id: Any, items: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while scalar(conn, "SELECT count(*) FROM kernel.channel_outbox WHERE run_id = %s", (run_id,)) < items:
        if time.monotonic() > deadline:
            raise BenchError(f"tenant A's run did not reach {items} items in {timeout} s")
        time.sleep(0.05)


def wait_until_completed(conn: psycopg.Connection, run_ids: list[Any], timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while scalar(conn, "SELECT count(*) FROM kernel.campaign_runs WHERE id = ANY(%s) AND completed_at IS NULL",
                 (run_ids,)):
        if time.monotonic() > deadline:
            raise BenchError(f"the runs did not complete in {timeout} s")
        time.sleep(0.05)


def run(ctx: Any) -> dict[str, Any]:
    alone = one(ctx, ctx.sizes.fair, 0)
    shared = one(ctx, ctx.sizes.fair, OTHERS)
    return {"alone": alone, "shared": shared, "throughput_ratio": shared["msgs_per_s"] / alone["msgs_per_s"],
            "worst_small_s": max(shared["small_deploy_to_completed_s"])}
