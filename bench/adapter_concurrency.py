"""Threads or asyncio for the HTTP adapters: the same POSTs to a receiver with a fixed delay.

    .venv/bin/python bench/adapter_concurrency.py [--requests 2000] [--latency-ms 50]

The receiver (an asyncio server that answers each POST after --latency-ms) runs in another
process, so that the client's CPU time is its own. For each concurrency, three clients:
  threads+new-connection  kernel 1.0's _http.post (one http.client connection per request)
  threads+WebhookAdapter  the shipped adapter: its keep-alive pool, N threads calling send()
  send_later              the same adapter as the daemon calls it: N calls started, no threads
  threads+httpx           one httpx.Client shared by N threads (what the adapters used first)
  asyncio+httpx           httpx.AsyncClient, N tasks
It prints requests/s, the ideal (concurrency / latency) and client CPU ms per request.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import multiprocessing
import resource
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx  # only for the comparison: pip install httpx

from kernel_driver.providers import OutboundItem, Outcome, SendResult
from kernel_driver.providers.webhook import WebhookAdapter


def serve(port_out: multiprocessing.connection.Connection, latency_s: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:")),
                    0,
                )
                await reader.readexactly(length)
                await asyncio.sleep(latency_s)
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
                             b'{"id": "x"}')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        port_out.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def item() -> OutboundItem:
    return OutboundItem(
        str(uuid.uuid4()), f"root:email:{uuid.uuid4()}:1", "email", "ann@example.com",
        {"subject": "Hi", "text": "Hello"}, "r", "c",
    )  # fmt: skip


def threads_new_connection(url: str, concurrency: int, n: int) -> int:
    host_port = url.split("/")[2]

    def one(_: int) -> bool:
        connection = http.client.HTTPConnection(host_port, timeout=10)
        try:
            connection.request("POST", "/hook", body=b"{}", headers={"Content-Type": "application/json"})
            return connection.getresponse().status == 201
        finally:
            connection.close()

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(one, range(n)))


def threads_adapter(url: str, concurrency: int, n: int) -> int:
    with WebhookAdapter({"url": url}, concurrency=concurrency) as adapter:
        items = [item() for _ in range(n)]
        ok = 0
        lock = threading.Lock()

        def one(it: OutboundItem) -> None:
            nonlocal ok
            if adapter.send(it).outcome is Outcome.ACCEPTED:
                with lock:
                    ok += 1

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, items))
        return ok


def adapter_send_later(url: str, concurrency: int, n: int) -> int:
    """The daemon's way: at most `concurrency` calls started with send_later, no thread per call."""
    with WebhookAdapter({"url": url}, concurrency=concurrency) as adapter:
        ok = 0
        finished = threading.Semaphore(0)
        slots = threading.Semaphore(concurrency)

        def done(result: SendResult) -> None:
            nonlocal ok
            ok += result.outcome is Outcome.ACCEPTED  # only the client's thread calls back
            slots.release()
            finished.release()

        for it in [item() for _ in range(n)]:
            slots.acquire()
            adapter.send_later(it, done)
        for _ in range(n):
            finished.acquire()
        return ok


def threads_httpx(url: str, concurrency: int, n: int) -> int:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(limits=limits, timeout=10) as client, ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(lambda _: client.post(url, content=b"{}").status_code == 201, range(n)))


def asyncio_httpx(url: str, concurrency: int, n: int) -> int:
    async def main() -> int:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            semaphore = asyncio.Semaphore(concurrency)

            async def one() -> bool:
                async with semaphore:
                    response = await client.post(url, content=b"{}", headers={"Content-Type": "application/json"})
                    created: bool = response.status_code == 201
                    return created

            return sum(await asyncio.gather(*(one() for _ in range(n))))

    return asyncio.run(main())


def measure(
    name: str, run: Callable[[str, int, int], int], url: str, concurrency: int, n: int, latency_s: float
) -> None:
    run(url, concurrency, min(n, concurrency * 2))  # warm up: connections, imports
    cpu, started = cpu_s(), time.perf_counter()
    ok = run(url, concurrency, n)
    wall, cpu = time.perf_counter() - started, cpu_s() - cpu
    print(
        f"| {name} | {concurrency} | {ok / wall:,.0f} | {concurrency / latency_s:,.0f} "
        f"| {ok / wall / (concurrency / latency_s):.2f} | {cpu / n * 1000:.2f} |",
        flush=True,
    )
    assert ok == n, f"{name}: {ok} of {n} accepted"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    args = parser.parse_args()
    latency_s = args.latency_ms / 1000

    receive, send = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.Process(target=serve, args=(send, latency_s), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{receive.recv()}/hook"
    print(f"{args.requests} POSTs per row, receiver latency {args.latency_ms:g} ms\n")
    print("| client | concurrency | requests/s | ideal | × ideal | client CPU ms/request |")
    print("|---|---:|---:|---:|---:|---:|")
    try:
        for concurrency in args.concurrency:
            for name, run in [
                ("threads, new connection per request (1.0)", threads_new_connection),
                ("threads, WebhookAdapter.send (keep-alive pool)", threads_adapter),
                ("event loop, WebhookAdapter.send_later (the daemon's way)", adapter_send_later),
                ("threads, httpx.Client", threads_httpx),
                ("asyncio, httpx.AsyncClient", asyncio_httpx),
            ]:
                measure(name, run, url, concurrency, args.requests, latency_s)
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
