"""A latency-bound provider: the webhook adapter against a local receiver answering after a
log-normal delay (median 50 ms, p99 400 ms), one daemon at each --concurrency; messages/s against
concurrency ÷ mean latency."""

from __future__ import annotations

import math
from typing import Any

from bench.config import Sizes
from bench.pg import SCHEMA, BenchError, deploy, kernel_database, run_daemons, verify_items
from bench.receiver import lognormal_mean_ms, receiver_stats, running_receiver
from kernel_driver.testing.seed import seed_campaign

MEDIAN_MS = 50
P99_MS = 400


def items_for(ctx: Any, concurrency: int) -> int:
    """Enough items for `latency_seconds` at the ideal rate: 5,000 items at --concurrency 256
    last 1.5 s at 3,430/s, and the daemon's start (0.3 s) and the last wave's slowest replies
    (the largest of 256 draws, about 1 s) then weigh as much as the throughput being measured."""
    sizes: Sizes = ctx.sizes
    ideal = concurrency / (lognormal_mean_ms(MEDIAN_MS, P99_MS) / 1000)
    return max(sizes.latency_n, math.ceil(ideal * sizes.latency_seconds))


def one(ctx: Any, concurrency: int) -> dict[str, Any]:
    n = items_for(ctx, concurrency)
    with running_receiver(MEDIAN_MS, P99_MS, ctx.sizes.seed) as url, \
            kernel_database(ctx.server_dsn, f"latency{concurrency}") as (dsn, conn):
        seeded = seed_campaign(conn, SCHEMA, contacts=n, provider="webhook", settings={"url": url})
        run_id = deploy(conn, seeded.campaign_id)
        timing = run_daemons(conn, dsn, [run_id], daemons=1, concurrency=concurrency, log_dir=ctx.log_dir,
                             label=f"latency{concurrency}")
        verified = verify_items(conn, [run_id], n)
        stats = receiver_stats(url)
    if stats["requests"] != n or stats["duplicates"]:
        raise BenchError(f"the receiver saw {stats['requests']} requests for {n} items, {stats['duplicates']} twice")
    mean_s = stats["mean_delay_s"]
    rate = n / timing["wall_s"]
    ideal = concurrency / mean_s
    return {"n": n, "concurrency": concurrency, **timing, **verified, "msgs_per_s": rate,
            "mean_delay_s": mean_s, "ideal_per_s": ideal, "ratio": rate / ideal}


def run(ctx: Any) -> dict[str, Any]:
    return {
        "median_ms": MEDIAN_MS, "p99_ms": P99_MS, "mean_ms_expected": lognormal_mean_ms(MEDIAN_MS, P99_MS),
        "runs": [one(ctx, c) for c in ctx.sizes.latency_concurrency],
    }
