"""Growth: one campaign of 10k / 100k / 1M contacts, one daemon: throughput, daemon peak RSS,
table and index sizes, dead tuples after the run."""

from __future__ import annotations

import time
from typing import Any

from bench.pg import SCHEMA, deploy, kernel_database, run_daemons, table_sizes, verify_items
from kernel_driver.testing.seed import seed_campaign


def one(ctx: Any, contacts: int) -> dict[str, Any]:
    with kernel_database(ctx.server_dsn, f"growth{contacts}") as (dsn, conn):
        started = time.perf_counter()
        seeded = seed_campaign(conn, SCHEMA, contacts=contacts, provider="noop")
        seed_s = time.perf_counter() - started
        started = time.perf_counter()
        run_id = deploy(conn, seeded.campaign_id)
        deploy_s = time.perf_counter() - started
        timing = run_daemons(conn, dsn, [run_id], daemons=1, concurrency=ctx.sizes.concurrency,
                             log_dir=ctx.log_dir, label=f"growth{contacts}")
        verified = verify_items(conn, [run_id], contacts)
        tables = table_sizes(conn)
    return {"n": contacts, "concurrency": ctx.sizes.concurrency, "seed_s": seed_s, "deploy_s": deploy_s, **timing,
            **verified, "msgs_per_s": contacts / timing["wall_s"], "tables": tables,
            "table_bytes": sum(t["table_bytes"] for t in tables.values()),
            "index_bytes": sum(t["index_bytes"] for t in tables.values()),
            "dead_tuples": sum(t["dead_tuples"] for t in tables.values())}


def run(ctx: Any) -> dict[str, Any]:
    return {"runs": [one(ctx, n) for n in ctx.sizes.growth]}
