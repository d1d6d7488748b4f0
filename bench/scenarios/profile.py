"""What limits the kernel, measured: the noop 1-daemon scenario again with track_functions = all
(and pg_stat_statements when the server preloads it; py-spy on the daemon when installed):
kernel functions by self time, statements by total time, commits, HOT updates, daemon top frames."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.pg import SCHEMA, deploy, kernel_database, run_daemons, scalar, table_sizes, verify_items
from bench.profile_frames import top_frames
from kernel_driver.testing.seed import seed_campaign

TOP = 12


def py_spy() -> str | None:
    found = Path(sys.executable).with_name("py-spy")
    path = str(found) if found.exists() else shutil.which("py-spy")
    if path and subprocess.run([path, "record", "--help"], capture_output=True).returncode == 0:
        return path
    return None


def try_pg_stat_statements(conn: psycopg.Connection) -> str | None:
    """None when usable, else why not (it needs shared_preload_libraries)."""
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")
        return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]


def run(ctx: Any) -> dict[str, Any]:
    n = ctx.sizes.profile_n
    with kernel_database(ctx.server_dsn, "profile") as (dsn, conn):
        name = scalar(conn, "SELECT current_database()")
        conn.execute(sql.SQL("ALTER DATABASE {} SET track_functions = 'all'").format(sql.Identifier(name)))
        statements = try_pg_stat_statements(conn)
        seeded = seed_campaign(conn, SCHEMA, contacts=n, provider="noop")
        run_id = deploy(conn, seeded.campaign_id)
        conn.execute("SELECT pg_stat_reset()")
        spy = py_spy()
        raw_path = ctx.log_dir / "py-spy.raw"
        prefix = ([spy, "record", "--format", "raw", "--gil", "--rate", "200", "--output", str(raw_path), "--"]
                  if spy else [])
        timing = run_daemons(conn, dsn, [run_id], daemons=1, concurrency=ctx.sizes.concurrency,
                             log_dir=ctx.log_dir, label="profile", prefix=prefix)
        verified = verify_items(conn, [run_id], n)
        conn.execute("SELECT pg_stat_clear_snapshot()")
        functions = [
            {"function": f, "calls": c, "total_ms": t, "self_ms": s}
            for f, c, t, s in conn.execute(
                "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions"
                " WHERE schemaname = %s ORDER BY self_time DESC LIMIT %s", (SCHEMA, TOP))
        ]
        function_ms = scalar(
            conn, "SELECT coalesce(sum(self_time), 0) FROM pg_stat_user_functions WHERE schemaname = %s", (SCHEMA,))
        commits = scalar(conn, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        top_statements: list[dict[str, Any]] | str = statements or []
        if statements is None:
            top_statements = [
                {"query": q[:160], "calls": c, "total_ms": t}
                for q, c, t in conn.execute(
                    "SELECT query, calls, total_exec_time FROM pg_stat_statements"
                    " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                    " ORDER BY total_exec_time DESC LIMIT %s", (TOP,))
            ]
        tables = table_sizes(conn)
    frames: dict[str, Any] | str
    if not spy:
        frames = "py-spy not available"
    elif raw_path.exists():
        frames = top_frames(raw_path.read_text(errors="replace"))
    else:
        frames = "py-spy wrote no profile (ptrace not permitted?)"
    return {"n": n, "concurrency": ctx.sizes.concurrency, **timing, **verified,
            "msgs_per_s": n / timing["wall_s"], "functions": functions, "function_self_ms_total": function_ms,
            "commits": commits, "statements": top_statements,
            "outbox_updates": tables.get("channel_outbox", {}).get("updates"),
            "outbox_hot_updates": tables.get("channel_outbox", {}).get("hot_updates"),
            "daemon_frames": frames}
