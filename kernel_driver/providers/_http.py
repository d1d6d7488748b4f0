"""One HTTP POST, classified: the plumbing the twilio and webhook adapters share.

Each client keeps its connections alive and pooled on an asyncio event loop of its own (one
thread), and parses replies with httptools (llhttp, the parser of Node and uvicorn). The daemon
starts calls there without a thread per call (`HttpAdapter.send_later`); `send` waits for one.
Measured on this machine (docs/providers.md, "Threads or asyncio"): 256 calls in flight cost
82 µs of CPU per request this way, 359 µs through http.client in 256 threads, and one daemon's
provider threads were the CPU it ran out of.

The classification depends on *when* a failure happened. Until the whole request is in the
kernel's send buffer (the transport's own buffer empty), nothing can have been acted on:
NOT_SENT. After it, the provider may have acted and its answer was lost: AMBIGUOUS.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import select
import ssl
import threading
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools

from kernel_driver.providers.base import OutboundItem, Outcome, ProviderAdapter, SendResult, describe_error

BODY_EXCERPT_CHARS = 2000
USER_AGENT = "kernel-driver"
# An idle connection is dropped after this long: shorter than the idle timeout of common servers
# (nginx 75 s, Node and Apache 5 s), so that we do not reuse a connection the server is closing.
KEEPALIVE_EXPIRY_S = 1.0

Origin = tuple[str, str, int]  # scheme, host, port
Answer = Callable[["HttpReply | TransportFailure"], None]


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def summary(self) -> dict[str, Any]:
        """The reply as it goes into outbox.provider_response."""
        parsed = self.json()
        if parsed is None:
            parsed = self.body.decode("utf-8", "replace")[:BODY_EXCERPT_CHARS]
        return {"http_status": self.status, "body": parsed}


class TransportFailure(Exception):
    def __init__(self, outcome: Outcome, error: str) -> None:
        super().__init__(error)
        self.outcome = outcome
        self.error = error


class _StaleConnection(Exception):
    """A pooled connection failed before the request was written: the server had closed it."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, collects the reply httptools parses."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._lost_error: BaseException | None = None
        self._drained: asyncio.Future[None] | None = None
        self._reply: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._headers_done = False
        self._delimited = False  # the reply has a Content-Length or chunks, else it ends at EOF

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Any byte left in the transport's buffer pauses writing, and resume_writing says when
        # the last one reached the kernel: the boundary between NOT_SENT and AMBIGUOUS.
        transport.set_write_buffer_limits(high=0, low=0)

    def pause_writing(self) -> None:
        self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._reply is not None and not self._reply.done() and self._headers_done and not self._delimited:
            self._reply.set_result((self._parser.get_status_code(), b"".join(self._body), False))
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    # httptools callbacks
    def on_header(self, name: bytes, _value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._delimited = True

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_result((self._parser.get_status_code(), b"".join(self._body),
                                    self._parser.should_keep_alive()))

    # used by HttpClient
    async def write(self, request: bytes) -> None:
        """Return once all of `request` is in the kernel; raise if the connection went first."""
        if self.lost or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection was closed")
        self._body, self._headers_done, self._delimited = [], False, False
        self._reply = self._loop.create_future()
        self._drained = None  # pause_writing makes a new one if this request does not fit at once
        self.transport.write(request)
        if self.transport.get_write_buffer_size() and self._drained is not None:
            await self._drained
        if self.lost:
            raise ConnectionResetError("the connection was lost while the request was written") from self._lost_error

    async def reply(self, timeout_s: float) -> tuple[int, bytes, bool]:
        assert self._reply is not None
        return await asyncio.wait_for(self._reply, timeout_s)

    def idle_and_open(self) -> bool:
        """Still open, and nothing arrived while idle (the server closing it, or unasked bytes)."""
        if self.lost or self.transport is None or self.transport.is_closing():
            return False
        sock = self.transport.get_extra_info("socket")
        return sock is not None and not select.select([sock], [], [], 0)[0]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        self._lost_error = self._lost_error or exc
        for waiter in (self._drained, self._reply):
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # retrieved here: no "never retrieved" warning when unawaited


class HttpClient:
    """Keep-alive connections to the adapter's endpoints, on an event loop of its own.

    At most `concurrency` connections are open; a request beyond that waits for one (up to the
    timeout, then NOT_SENT). `post` waits for the reply; `post_later` hands it to a callback.
    """

    def __init__(self, timeout_s: float, concurrency: int) -> None:
        self._timeout_s = timeout_s
        self._max_idle = concurrency
        self._tls = ssl.create_default_context()  # the system's trust store
        self._idle: dict[Origin, list[tuple[_Connection, float]]] = {}
        self._slots = asyncio.Semaphore(concurrency)
        # post_later's calls, taken by the loop in batches: one wake-up of the loop (a write to
        # its self-pipe) for all the calls a daemon's step starts, not one per call.
        self._starting: deque[tuple[str, bytes, Mapping[str, str], Answer]] = deque()
        self._start_scheduled = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-client", daemon=True)
        self._thread.start()
        self._closed = False

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpReply:
        """POST `body` to `url`; raise TransportFailure (NOT_SENT or AMBIGUOUS) when no reply came."""
        try:
            return asyncio.run_coroutine_threadsafe(self._post(url, body, headers), self._loop).result()
        except concurrent.futures.CancelledError:  # close() while the call was in flight
            raise TransportFailure(Outcome.AMBIGUOUS, _abandoned(url)) from None

    def post_later(self, url: str, body: bytes, headers: Mapping[str, str],
                   done: Answer) -> None:
        """Start the POST; `done` gets the reply or the TransportFailure, on the client's thread."""
        self._starting.append((url, body, headers, done))
        if not self._start_scheduled:
            self._start_scheduled = True
            self._loop.call_soon_threadsafe(self._start_all)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._close_idle(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # --- on the client's loop -----------------------------------------------------------------

    def _start_all(self) -> None:
        # Cleared before the queue is read: a call appended from now on schedules another pass.
        self._start_scheduled = False
        while self._starting:
            self._start(*self._starting.popleft())

    def _start(self, url: str, body: bytes, headers: Mapping[str, str], done: Answer) -> None:
        task = self._loop.create_task(self._post(url, body, headers))

        def finished(task: asyncio.Task[HttpReply]) -> None:
            if task.cancelled():  # the client closed with the call in flight
                done(TransportFailure(Outcome.AMBIGUOUS, _abandoned(url)))
                return
            failure = task.exception()
            if failure is None:
                done(task.result())
            elif isinstance(failure, TransportFailure):
                done(failure)
            else:  # a bug of ours after the request may have left
                done(TransportFailure(Outcome.AMBIGUOUS, f"request to {url}: {describe_error(failure)}"))

        task.add_done_callback(finished)

    async def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpReply:
        parts = urlsplit(url)
        origin = (parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = _request_bytes(origin, target, body, headers)
        try:
            if self._slots.locked():  # all connections busy: wait for one, not forever
                await asyncio.wait_for(self._slots.acquire(), self._timeout_s)
            else:
                await self._slots.acquire()
        except TimeoutError:
            raise TransportFailure(
                Outcome.NOT_SENT, f"request to {origin[1]}:{origin[2]} not sent: all connections busy"
            ) from None
        try:
            connection = self._take(origin)
            if connection is not None:
                try:
                    return await self._exchange(origin, connection, True, request)
                except _StaleConnection:
                    pass  # nothing reached the server: once more on a new connection
            return await self._exchange(origin, await self._open(origin), False, request)
        finally:
            self._slots.release()

    async def _open(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        https = scheme == "https"
        try:
            _, connection = await asyncio.wait_for(
                self._loop.create_connection(lambda: _Connection(self._loop), host, port,
                                             ssl=self._tls if https else None, server_hostname=host if https else None),
                self._timeout_s,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            # refused, DNS, TLS, connect timeout: a server cannot act on a request it never got
            raise TransportFailure(
                Outcome.NOT_SENT, f"request to {host}:{port} not sent: {describe_error(exc)}"
            ) from None
        return connection

    async def _exchange(self, origin: Origin, connection: _Connection, reused: bool, request: bytes) -> HttpReply:
        where = f"{origin[1]}:{origin[2]}"
        try:
            await connection.write(request)
        except OSError as exc:
            connection.close()
            if reused:
                raise _StaleConnection from exc
            # the request not fully written: a server cannot act on a request it did not receive whole
            raise TransportFailure(Outcome.NOT_SENT, f"request to {where} not sent: {describe_error(exc)}") from None
        try:
            status, body, keep_alive = await connection.reply(self._timeout_s)
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            connection.close()
            raise TransportFailure(
                Outcome.AMBIGUOUS, f"request to {where} sent but no reply: {describe_error(exc)}"
            ) from None
        if keep_alive and not self._closed:
            self._give_back(origin, connection)
        else:
            connection.close()
        return HttpReply(status, body)

    def _take(self, origin: Origin) -> _Connection | None:
        """An idle connection that is still good, or None."""
        idle = self._idle.get(origin)
        while idle:
            connection, idle_since = idle.pop()
            if time.monotonic() - idle_since <= KEEPALIVE_EXPIRY_S and connection.idle_and_open():
                return connection
            connection.close()
        return None

    def _give_back(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) < self._max_idle:
            idle.append((connection, time.monotonic()))
        else:
            connection.close()

    async def _close_idle(self) -> None:
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection, _ in connections:
                connection.close()
        await asyncio.sleep(0)  # let the transports run their close callbacks


def _abandoned(url: str) -> str:
    return f"request to {url} abandoned: the client closed"


def _request_bytes(origin: Origin, target: str, body: bytes, headers: Mapping[str, str]) -> bytes:
    """The whole request in one write (one segment on the wire when it fits)."""
    scheme, host, port = origin
    default_port = 443 if scheme == "https" else 80
    lines = [f"POST {target} HTTP/1.1", f"Host: {host if port == default_port else f'{host}:{port}'}",
             f"User-Agent: {USER_AGENT}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def outcome_for_status(status: int, also_accepted: Collection[int] = ()) -> Outcome:
    if 200 <= status < 300 or status in also_accepted:
        return Outcome.ACCEPTED
    if status in (408, 429):  # the server says it did not process the request: try later
        return Outcome.NOT_SENT
    if 400 <= status < 500:
        return Outcome.REJECTED
    if status >= 500:  # it may have acted before failing
        return Outcome.AMBIGUOUS
    return Outcome.REJECTED  # 1xx/3xx to a POST: a misconfigured endpoint that acted on nothing


@dataclass(frozen=True)
class HttpRequest:
    """One provider call as an HTTP POST; `message_id` picks the id from an accepted reply."""

    url: str
    body: bytes
    headers: Mapping[str, str]
    message_id: Callable[[HttpReply], str | None]
    also_accepted: Collection[int] = field(default=())

    def classify(self, answer: HttpReply | TransportFailure) -> SendResult:
        if isinstance(answer, TransportFailure):
            return SendResult.failed(answer.outcome, answer.error, {"url": self.url})
        outcome = outcome_for_status(answer.status, self.also_accepted)
        if outcome is Outcome.ACCEPTED:
            return SendResult.accepted(self.message_id(answer), answer.summary())
        return SendResult.failed(outcome, f"HTTP {answer.status}: {_error_detail(answer)}", answer.summary())


class HttpAdapter(ProviderAdapter):
    """An adapter whose call is one HTTP POST (`request`): sent by `send`, or started by
    `send_later` on the client's loop without a thread of the daemon's."""

    _http: HttpClient

    @abstractmethod
    def request(self, item: OutboundItem) -> HttpRequest | SendResult:
        """The POST for `item`, or the SendResult when it cannot be made (nothing sent)."""

    def deliver(self, item: OutboundItem) -> SendResult:
        request = self.request(item)
        if isinstance(request, SendResult):
            return request
        try:
            answer: HttpReply | TransportFailure = self._http.post(request.url, request.body, request.headers)
        except TransportFailure as failure:
            answer = failure
        return request.classify(answer)

    def send_later(self, item: OutboundItem, done: Callable[[SendResult], None]) -> bool:
        refused = self.refused(item)
        if refused is not None:
            done(refused)
            return True
        try:
            request = self.request(item)
        except Exception as exc:  # an adapter bug, before anything was sent
            done(self.adapter_error(item, exc))
            return True
        if isinstance(request, SendResult):
            done(request)
            return True

        def classified(answer: HttpReply | TransportFailure) -> None:
            try:
                result = request.classify(answer)
            except Exception as exc:  # an adapter bug: the reply came, what it meant is unknown
                result = self.adapter_error(item, exc)
            done(result)

        self._http.post_later(request.url, request.body, request.headers, classified)
        return True

    def close(self) -> None:
        self._http.close()


def _error_detail(reply: HttpReply) -> str:
    parsed = reply.json()
    if isinstance(parsed, dict):
        for key in ("message", "error", "detail"):
            if parsed.get(key):
                return str(parsed[key])
    return reply.body.decode("utf-8", "replace")[:200] or "(empty body)"
