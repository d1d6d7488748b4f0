"""The same N no-op jobs through procrastinate, graphile-worker (batched and default) and pg-boss,
each in its own fresh database, each verified to have done all N."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.pg import ROOT, BenchError, fresh_database, run_json_command, url_dsn

NODE_DIR = ROOT / "bench" / "peers" / "node"
PROCRASTINATE = ROOT / "bench" / "peers" / "procrastinate_peer.py"
BENCH_PYTHON = ROOT / ".bench" / "venv" / "bin" / "python"


def node_ready() -> str | None:
    return None if (NODE_DIR / "node_modules" / "graphile-worker").exists() else "run `make bench-deps` (npm ci)"


def procrastinate_ready() -> str | None:
    if not BENCH_PYTHON.exists():
        return "run `make bench-deps` (.bench/venv)"
    return None


def node_peer(ctx: Any, script: str, n: int, mode: str, enqueue: str = "bulk") -> dict[str, Any]:
    if (why := node_ready()) is not None:
        return {"skipped": why}
    with fresh_database(ctx.server_dsn, Path(script).stem.replace("-", "")) as dsn:
        result = run_json_command(["node", script, "--dsn", url_dsn(dsn), "--n", str(n), "--mode", mode,
                                   "--enqueue", enqueue], timeout=3600, cwd=NODE_DIR)
    return finish(result, n)


def finish(result: dict[str, Any], n: int) -> dict[str, Any]:
    checked = result.get("completed", result.get("succeeded"))
    if result["done"] != n or (checked is not None and checked != n) or result.get("jobs_left", 0) != 0:
        raise BenchError(f"{result['peer']} did not do all {n} jobs: {result}")
    result["msgs_per_s"] = n / result["drain_s"]
    result["enqueue_per_s"] = n / result["enqueue_s"]
    return result


def procrastinate(ctx: Any, n: int) -> dict[str, Any]:
    if (why := procrastinate_ready()) is not None:
        return {"skipped": why}
    with fresh_database(ctx.server_dsn, "procrastinate") as dsn:
        result = run_json_command([str(BENCH_PYTHON), str(PROCRASTINATE), "--dsn", dsn, "--n", str(n),
                                   "--concurrency", "10"], timeout=3600)
    return finish(result, n)


def run(ctx: Any) -> dict[str, Any]:
    n = ctx.sizes.n
    return {
        "procrastinate": procrastinate(ctx, n),
        "graphile_batched": node_peer(ctx, "graphile.js", n, "batched"),
        "graphile_default": node_peer(ctx, "graphile.js", n, "default"),
        "pgboss_batched": node_peer(ctx, "pgboss.js", n, "batched"),
    }
