"""Many small campaigns: one-contact campaigns deployed one by one (deploys/s), then drained by one
daemon at --concurrency 16; beside as many single jobs through graphile-worker and pg-boss."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg

from bench.pg import analyze_host_tables, deploy, kernel_database, run_daemons, verify_items
from bench.scenarios import peers

CONCURRENCY = 16


def seed_one_contact_campaigns(conn: psycopg.Connection, count: int, provider: str,
                               settings: dict[str, Any] | None = None) -> list[uuid.UUID]:
    """`count` campaigns of one contact each in one workspace; their ids in order."""
    import json

    tenant, workspace = uuid.uuid4(), uuid.uuid4()
    with conn.transaction():
        conn.execute(
            """INSERT INTO kernel.provider_configs (workspace_id, channel, provider, settings, tenant_id)
               VALUES (%s, 'email', %s, %s, %s)""", (workspace, provider, json.dumps(settings or {}), tenant))
        conn.execute(
            """INSERT INTO kernel.contacts (tenant_id, workspace_id, email)
               SELECT %(t)s, %(w)s, 'c' || g || '@small.example.test' FROM generate_series(1, %(n)s) AS g""",
            {"t": tenant, "w": workspace, "n": count})
        conn.execute(
            """INSERT INTO kernel.campaigns (tenant_id, workspace_id, name, channel, content)
               SELECT %(t)s, %(w)s, 'one contact ' || g, 'email',
                      '{"subject": "Your code", "text": "1234"}'::jsonb
               FROM generate_series(1, %(n)s) AS g""", {"t": tenant, "w": workspace, "n": count})
        conn.execute(
            """INSERT INTO kernel.campaign_audience (campaign_id, contact_id, tenant_id)
               SELECT c.id, k.id, %(t)s
               FROM (SELECT id, row_number() OVER (ORDER BY name) AS r
                     FROM kernel.campaigns WHERE workspace_id = %(w)s) c
               JOIN (SELECT id, row_number() OVER (ORDER BY email) AS r
                     FROM kernel.contacts WHERE workspace_id = %(w)s) k
                 USING (r)""", {"w": workspace, "t": tenant})
        analyze_host_tables(conn)
        return [row[0] for row in conn.execute(
            "SELECT id FROM kernel.campaigns WHERE workspace_id = %s ORDER BY created_at, name", (workspace,))]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def kernel(ctx: Any, count: int) -> dict[str, Any]:
    with kernel_database(ctx.server_dsn, "small") as (dsn, conn):
        campaigns = seed_one_contact_campaigns(conn, count, "noop")
        each, run_ids = [], []
        started = time.perf_counter()
        for campaign in campaigns:
            t = time.perf_counter()
            run_ids.append(deploy(conn, campaign))
            each.append(time.perf_counter() - t)
        deploy_s = time.perf_counter() - started
        timing = run_daemons(conn, dsn, run_ids, daemons=1, concurrency=CONCURRENCY, log_dir=ctx.log_dir,
                             label="small")
        verified = verify_items(conn, run_ids, count)
    return {"n": count, "concurrency": CONCURRENCY, "deploy_s": deploy_s, "deploys_per_s": count / deploy_s,
            "deploy_p50_ms": percentile(each, 50) * 1000, "deploy_p99_ms": percentile(each, 99) * 1000,
            **timing, **verified, "msgs_per_s": count / timing["wall_s"]}


def run(ctx: Any) -> dict[str, Any]:
    count = ctx.sizes.small_campaigns
    return {
        "kernel": kernel(ctx, count),
        "graphile_default": peers.node_peer(ctx, "graphile.js", count, "default", enqueue="single"),
        "pgboss_batched": peers.node_peer(ctx, "pgboss.js", count, "batched", enqueue="single"),
    }
