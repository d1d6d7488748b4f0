"""The latency-bound provider the benchmark sends to: `bench/peers/node/receiver.js`, a Node
HTTP server answering each POST after a log-normal delay (median and p99 given, seeded). It runs
in Node, not in Python, so that the thousands of requests a second at --concurrency 256 cost
the daemon's two cores little; a real provider runs on other machines. This module starts it,
reads its stats and knows the distribution's mean."""

from __future__ import annotations

import json
import math
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.pg import ROOT

RECEIVER_JS = ROOT / "bench" / "peers" / "node" / "receiver.js"
Z99 = 2.3263478740408408  # the standard normal's 99th percentile


def lognormal_sigma(median_ms: float, p99_ms: float) -> float:
    return math.log(p99_ms / median_ms) / Z99 if p99_ms > median_ms > 0 else 0.0


def lognormal_mean_ms(median_ms: float, p99_ms: float) -> float:
    return median_ms * math.exp(lognormal_sigma(median_ms, p99_ms) ** 2 / 2)


@contextmanager
def running_receiver(median_ms: float, p99_ms: float, seed: int) -> Iterator[str]:
    """Start the receiver process; yield its URL; stop it."""
    process = subprocess.Popen(["node", str(RECEIVER_JS), "--median-ms", str(median_ms), "--p99-ms", str(p99_ms),
                                "--seed", str(seed)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield f"http://127.0.0.1:{int(process.stdout.readline())}/"
    finally:
        process.terminate()
        process.wait(10)


def receiver_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        stats: dict[str, Any] = json.loads(reply.read())
        return stats
