"""Console: what each page of `kernel-driver ui` costs on one run of 1,000,000 items (issue 11),
as a tenant (row-level security) and as the admin. Pages are requested through Flask's test
client over a real connection pool, so the time is the server's: the queries and the template,
not the network. Every 50th contact has no address, so `skipped` is a status spread thin over
every job: the page a filter on a rare status needs."""

from __future__ import annotations

import statistics
import time
from typing import Any

from psycopg_pool import ConnectionPool

from bench.pg import SCHEMA, deploy, kernel_database, run_daemons
from kernel_driver.config import Settings
from kernel_driver.console.app import Console, create_app
from kernel_driver.console.auth import Access, Tokens
from kernel_driver.testing.seed import seed_campaign

REPEATS = 7
TENANT, ADMIN = "bench-tenant-token-000000", "bench-admin-token-0000000"


def run(ctx: Any) -> dict[str, Any]:
    contacts = ctx.sizes.console
    with kernel_database(ctx.server_dsn, "console") as (dsn, conn):
        seeded = seed_campaign(conn, SCHEMA, contacts=contacts, provider="noop", no_address_every=50)
        run_id = deploy(conn, seeded.campaign_id)
        run_daemons(conn, dsn, [run_id], daemons=1, concurrency=ctx.sizes.concurrency, log_dir=ctx.log_dir,
                    label="console")
        conn.execute("VACUUM ANALYZE")  # as autovacuum would have by the time someone looks
        (middle,) = conn.execute(f"SELECT id FROM {SCHEMA}.channel_outbox WHERE run_id = %s ORDER BY id"
                                 " OFFSET %s LIMIT 1", (run_id, contacts // 2)).fetchall()[0]
        pages = {
            "runs list": "/",
            "run drawer (counts, first jobs, items, timeline)": f"/runs/{run_id}",
            "run drawer, items from the middle (keyset)": f"/runs/{run_id}?after={middle}",
            "run drawer, skipped items only": f"/runs/{run_id}?items=skipped",
            "live summary (redrawn every 2 s)": f"/runs/{run_id}?fragment=summary",
        }
        # Not a page of the run: the checklist counts the campaign's audience of a million
        # contacts, as deploy does (the kernel's check), so it has no target here.
        campaign_pages = {"launch checklist (an audience of the same size)": f"/campaigns/{seeded.campaign_id}"}
        tokens = Tokens([(TENANT, Access(seeded.tenant_id)), (ADMIN, Access(None))])
        options = {"autocommit": True, "prepare_threshold": None}
        with ConnectionPool(dsn, min_size=1, max_size=2, kwargs=options) as pool:
            client = create_app(Console(Settings(dsn=dsn, schema=SCHEMA), tokens, pool)).test_client()
            timings = []
            for name, url in {**pages, **campaign_pages}.items():
                for who, token in (("tenant", TENANT), ("admin", ADMIN)):
                    took = []
                    for _ in range(REPEATS):
                        started = time.perf_counter()
                        response = client.get(url, headers={"Authorization": f"Bearer {token}"})
                        took.append((time.perf_counter() - started) * 1000)
                        if response.status_code != 200:
                            raise RuntimeError(f"{url} as {who}: HTTP {response.status_code}")
                    timings.append({"page": name, "as": who, "run_page": name in pages,
                                    "median_ms": statistics.median(took),
                                    "max_ms": max(took), "bytes": len(response.data)})
    return {"n": contacts, "repeats": REPEATS, "pages": timings}
