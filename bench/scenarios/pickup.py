"""Pick-up latency: an idle daemon; one-contact campaigns deployed one at a time (each after the
previous run completed and a random pause): deploy → first provider call (the receiver's clock)
and → run completed (campaign_runs.completed_at); p50 and p99."""

from __future__ import annotations

import random
import time
from typing import Any

from bench.pg import BenchError, deploy, kernel_database, one, start_daemon
from bench.receiver import receiver_stats, running_receiver
from bench.scenarios.small import percentile, seed_one_contact_campaigns


def run(ctx: Any) -> dict[str, Any]:
    count = ctx.sizes.pickup
    rng = random.Random(ctx.sizes.seed)
    with running_receiver(0, 0, ctx.sizes.seed) as url, kernel_database(ctx.server_dsn, "pickup") as (dsn, conn):
        campaigns = seed_one_contact_campaigns(conn, count, "webhook", {"url": url})
        daemon = start_daemon(dsn, "pickup", 16, ctx.log_dir, until_idle=False)
        try:
            deadline = time.monotonic() + 30
            while b"worker started" not in daemon.log.read_bytes():
                if daemon.exit_code is not None or time.monotonic() > deadline:
                    raise BenchError(f"the daemon did not start; its log: {daemon.log}")
                time.sleep(0.05)
            time.sleep(0.5)
            deployed: dict[str, float] = {}
            completed: dict[str, float] = {}
            for campaign in campaigns:
                time.sleep(rng.uniform(0.02, 0.1))
                t0 = time.time()
                run_id = deploy(conn, campaign)
                deployed[str(run_id)] = t0
                limit = time.monotonic() + 30
                while True:
                    row = one(conn, "SELECT status, extract(epoch FROM completed_at)::float8"
                                    " FROM kernel.campaign_runs WHERE id = %s", (run_id,))
                    if row[0] in ("completed", "failed", "cancelled"):
                        completed[str(run_id)] = row[1]
                        break
                    if time.monotonic() > limit:
                        raise BenchError(f"run {run_id} not completed within 30 s")
                    time.sleep(0.002)
        finally:
            daemon.stop()
        stats = receiver_stats(url)
    first = stats["first_by_run"]
    if len(first) != count or stats["duplicates"]:
        raise BenchError(f"the receiver saw {len(first)} of {count} runs, {stats['duplicates']} duplicates")
    to_call = [first[r] - t0 for r, t0 in deployed.items()]
    to_done = [completed[r] - t0 for r, t0 in deployed.items()]
    return {"n": count, "to_first_call_p50_ms": percentile(to_call, 50) * 1000,
            "to_first_call_p99_ms": percentile(to_call, 99) * 1000,
            "to_completed_p50_ms": percentile(to_done, 50) * 1000,
            "to_completed_p99_ms": percentile(to_done, 99) * 1000,
            "peak_rss_mib": daemon.maxrss_kib / 1024}
