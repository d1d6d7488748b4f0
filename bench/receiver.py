"""A local HTTP receiver for the `webhook` adapter: answers each POST after a log-normal delay
(median and p99 given; seedable), keep-alive, one thread per connection, on 127.0.0.1 only.

Run as its own process (`python -m bench.receiver`), so its threads do not share a GIL with the
benchmark: it prints its port on the first line; `GET /stats` returns what it saw (requests, the
mean delay it applied, keys seen more than once, the first arrival per run_id)."""

from __future__ import annotations

import argparse
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
import json
import math
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Z99 = 2.3263478740408408  # the standard normal's 99th percentile


def lognormal_sigma(median_ms: float, p99_ms: float) -> float:
    return math.log(p99_ms / median_ms) / Z99 if p99_ms > median_ms > 0 else 0.0


def lognormal_mean_ms(median_ms: float, p99_ms: float) -> float:
    return median_ms * math.exp(lognormal_sigma(median_ms, p99_ms) ** 2 / 2)


class Receiver:
    def __init__(self, median_ms: float, p99_ms: float, seed: int) -> None:
        self.median_s = median_ms / 1000
        self.sigma = lognormal_sigma(median_ms, p99_ms)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.delay_total = 0.0
        self.keys: set[str] = set()
        self.duplicates = 0
        self.first_by_run: dict[str, float] = {}

    def arrive(self, body: dict[str, Any]) -> float:
        now = time.time()
        with self.lock:
            delay = self.median_s * math.exp(self.sigma * self.rng.gauss(0, 1)) if self.median_s else 0.0
            self.requests += 1
            self.delay_total += delay
            key = str(body.get("idempotency_key"))
            if key in self.keys:
                self.duplicates += 1
            self.keys.add(key)
            self.first_by_run.setdefault(str(body.get("run_id")), now)
        return delay

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": self.requests, "distinct_keys": len(self.keys), "duplicates": self.duplicates,
                    "mean_delay_s": self.delay_total / self.requests if self.requests else None,
                    "first_by_run": dict(self.first_by_run)}


def make_handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            delay = receiver.arrive(body)
            if delay:
                time.sleep(delay)
            self._reply(200, {"id": body.get("idempotency_key")})

        def do_GET(self) -> None:  # noqa: N802
            self._reply(200, receiver.stats())

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # 256 daemon connections may arrive at once


@contextmanager
def running_receiver(median_ms: float, p99_ms: float, seed: int) -> Iterator[str]:
    """Start the receiver process; yield its URL; stop it."""
    process = subprocess.Popen([sys.executable, "-m", "bench.receiver", "--median-ms", str(median_ms),
                                "--p99-ms", str(p99_ms), "--seed", str(seed)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield f"http://127.0.0.1:{int(process.stdout.readline())}/"
    finally:
        process.terminate()
        process.wait(10)


def receiver_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--median-ms", type=float, default=50)
    parser.add_argument("--p99-ms", type=float, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    server = Server(("127.0.0.1", 0), make_handler(Receiver(args.median_ms, args.p99_ms, args.seed)))
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
