"""The floor: INSERT outbox-like rows, then UPDATE them to sent, 500 rows per transaction."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from bench.cpu import busy_since, machine_busy_s
from bench.pg import fresh_database, scalar

BATCH = 500
TABLE = """CREATE TABLE floor_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id uuid NOT NULL,
    contact_id uuid NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    idempotency_key text NOT NULL UNIQUE,
    recipient text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz
)"""


def run(ctx: Any) -> dict[str, Any]:
    n = ctx.sizes.n
    with fresh_database(ctx.server_dsn, "floor") as dsn, psycopg.connect(dsn) as conn:
        conn.execute(TABLE)
        conn.commit()
        run_id = scalar(conn, "SELECT gen_random_uuid()")
        started, busy_before = time.perf_counter(), machine_busy_s()
        for first in range(0, n, BATCH):
            size = min(BATCH, n - first)
            ids = [row[0] for row in conn.execute(
                """INSERT INTO floor_outbox (run_id, contact_id, idempotency_key, recipient)
                   SELECT %(run)s, gen_random_uuid(), %(run)s::text || ':' || g, 'c' || g || '@example.test'
                   FROM generate_series(%(first)s::int, %(last)s::int) AS g RETURNING id""",
                {"run": run_id, "first": first, "last": first + size - 1}).fetchall()]
            conn.commit()
            conn.execute("UPDATE floor_outbox SET status = 'sent', sent_at = now() WHERE id = ANY(%s)", (ids,))
            conn.commit()
        wall, machine_cpu_s = time.perf_counter() - started, busy_since(busy_before)
        sent = scalar(conn, "SELECT count(*) FROM floor_outbox WHERE status = 'sent'")
    if sent != n:
        raise AssertionError(f"floor: {sent} of {n} rows sent")
    return {"n": n, "wall_s": wall, "msgs_per_s": n / wall, "machine_cpu_s": machine_cpu_s}
