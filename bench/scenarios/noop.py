"""The kernel end to end with the noop provider: 1 and 2 daemons on one campaign of N contacts."""

from __future__ import annotations

import time
from typing import Any

from bench.pg import SCHEMA, deploy, kernel_database, run_daemons, start_daemon, table_sizes, verify_items
from kernel_driver.testing.seed import seed_campaign


def one(ctx: Any, contacts: int, daemons: int, concurrency: int, label: str) -> dict[str, Any]:
    with kernel_database(ctx.server_dsn, label) as (dsn, conn):
        seeded = seed_campaign(conn, SCHEMA, contacts=contacts, provider="noop")
        run_id = deploy(conn, seeded.campaign_id)
        timing = run_daemons(conn, dsn, [run_id], daemons=daemons, concurrency=concurrency,
                             log_dir=ctx.log_dir, label=label)
        verified = verify_items(conn, [run_id], contacts)
        return {"n": contacts, "daemons": daemons, "concurrency": concurrency, **timing, **verified,
                "msgs_per_s": contacts / timing["wall_s"], "tables": table_sizes(conn)}


SMALL_WINDOW = 16  # the daemon's usual window, for comparison


def idle_start(ctx: Any) -> dict[str, Any]:
    """What a daemon's start costs before any work: --until-idle on an empty queue."""
    with kernel_database(ctx.server_dsn, "noopidle") as (dsn, _):
        started = time.time()
        daemon = start_daemon(dsn, "noop-idle", ctx.sizes.concurrency, ctx.log_dir)
        daemon.join(60)
        return {"exited_s": (daemon.ended_at or started) - started, "cpu_s": daemon.cpu_s,
                "exit_code": daemon.exit_code}


def run(ctx: Any) -> dict[str, Any]:
    runs = {f"daemons_{d}": one(ctx, ctx.sizes.n, d, ctx.sizes.concurrency, f"noop{d}") for d in (1, 2)}
    if ctx.sizes.concurrency != SMALL_WINDOW:
        runs["daemons_1_small_window"] = one(ctx, ctx.sizes.n, 1, SMALL_WINDOW, "noop1w")
    runs["idle_start"] = idle_start(ctx)
    return runs
