"""Sizes of one benchmark run: the full defaults (`make bench`), the smoke ones (`make bench-smoke`),
each overridable by an environment variable (BENCH_N, ...)."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class Sizes:
    n: int  # noop end to end and the peers
    concurrency: int  # the noop daemons' --concurrency
    profile_n: int
    latency_n: int  # at least this many items per concurrency...
    latency_seconds: int  # ...and at least this many seconds' worth at concurrency / mean latency
    latency_concurrency: tuple[int, ...]
    small_campaigns: int
    growth: tuple[int, ...]
    fair: int  # tenant A's contacts in the fair-claims scenario
    pickup: int
    seed: int
    console: int  # items of the run whose console pages are timed


# noop runs at --concurrency 500, the batch of its neighbours in the table: the floor writes 500
# rows per transaction, graphile-worker's localQueue and pg-boss's batchSize are 500. It is the
# crash window too (at most 500 items end unknown after a kill -9); a row at 16 stays beside it.
FULL = dict(n="20000", concurrency="500", profile_n="30000", latency_n="5000", latency_seconds="10",
            latency_concurrency="16,64,256", small_campaigns="2000", growth="10000,100000,1000000",
            fair="1000000", pickup="200", seed="1", console="1000000")
SMOKE = dict(n="2000", concurrency="500", profile_n="2000", latency_n="300", latency_seconds="0",
             latency_concurrency="16,64,256", small_campaigns="200", growth="2000,10000",
             fair="20000", pickup="30", seed="1", console="2000")


def sizes(smoke: bool, environ: dict[str, str] | None = None) -> Sizes:
    env = os.environ if environ is None else environ
    base = SMOKE if smoke else FULL
    value = {key: env.get(f"BENCH_{key.upper()}", default) for key, default in base.items()}
    return Sizes(
        n=int(value["n"]), concurrency=int(value["concurrency"]), profile_n=int(value["profile_n"]),
        latency_n=int(value["latency_n"]), latency_seconds=int(value["latency_seconds"]),
        latency_concurrency=_ints(value["latency_concurrency"]),
        small_campaigns=int(value["small_campaigns"]), growth=_ints(value["growth"]), fair=int(value["fair"]),
        pickup=int(value["pickup"]), seed=int(value["seed"]), console=int(value["console"]),
    )


def server_dsn(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("KERNEL_BENCH_DSN") or env.get("KERNEL_TEST_DSN") or DEFAULT_DSN
