"""N no-op jobs through procrastinate 3 (run with .bench/venv's Python): defer in one batch, then
drain with one worker at --concurrency (wait=False: the worker exits when the queue is empty).

Prints one JSON line: enqueue_s, drain_s, machine_cpu_s (the drain's), done (the task's own
counter) and succeeded (the jobs table's count)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from importlib.metadata import version
from pathlib import Path

import procrastinate

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench is the repository's
from bench.cpu import busy_since, machine_busy_s


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=args.dsn))
    done = 0

    @app.task(name="noop")
    async def noop(i: int) -> None:
        nonlocal done
        done += 1

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        started = time.perf_counter()
        for first in range(0, args.n, 5000):
            await noop.batch_defer_async(*({"i": i} for i in range(first, min(args.n, first + 5000))))
        enqueue_s = time.perf_counter() - started
        started, busy_before = time.perf_counter(), machine_busy_s()
        await app.run_worker_async(concurrency=args.concurrency, wait=False)
        drain_s, machine_cpu_s = time.perf_counter() - started, busy_since(busy_before)
        rows = await app.connector.execute_query_all_async(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'succeeded'"
        )
    print(json.dumps({
        "peer": "procrastinate", "version": version("procrastinate"), "mode": f"concurrency {args.concurrency}",
        "enqueue": "bulk", "n": args.n, "done": done, "succeeded": rows[0]["n"],
        "enqueue_s": enqueue_s, "drain_s": drain_s, "machine_cpu_s": machine_cpu_s,
    }))


if __name__ == "__main__":
    asyncio.run(main())
