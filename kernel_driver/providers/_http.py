"""One HTTP POST, classified: the plumbing the twilio and webhook adapters share.

Connections are kept alive and pooled, one pool per adapter, holding up to the daemon's
concurrency. http.client rather than httpx: measured on this machine (docs/providers.md,
"Threads or asyncio"), an httpx.Client shared by 64 threads spent 2.9 ms of CPU per request and
reached 0.27 of concurrency / latency; http.client with this pool 0.37 ms and 0.93.

The classification depends on *when* a failure happened, and http.client shows it: request()
returns once the whole request is written; before that nothing can have been acted on
(NOT_SENT); after it, the provider may have acted and its answer was lost (AMBIGUOUS).
"""

from __future__ import annotations

import http.client
import json
import select
import ssl
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kernel_driver.providers.base import Outcome, SendResult, describe_error

BODY_EXCERPT_CHARS = 2000
USER_AGENT = "kernel-driver"
# An idle connection is dropped after this long: shorter than the idle timeout of common servers
# (nginx 75 s, Node and Apache 5 s), so that we do not reuse a connection the server is closing.
KEEPALIVE_EXPIRY_S = 1.0


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


class HttpClient:
    """Keep-alive connections to the adapter's endpoints, shared by the threads that call it.

    Each send takes an idle connection (or opens one) for itself and gives it back after the
    reply: no lock is held during I/O. At most `concurrency` connections are open; a send
    beyond that waits for one (up to the timeout, then NOT_SENT).
    """

    def __init__(self, timeout_s: float, concurrency: int) -> None:
        self._timeout_s = timeout_s
        self._max_idle = concurrency
        self._tls = ssl.create_default_context()  # the system's trust store
        self._idle: dict[tuple[str, str, int], list[tuple[http.client.HTTPConnection, float]]] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._closed = False

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpReply:
        """POST `body` to `url`; raise TransportFailure (NOT_SENT or AMBIGUOUS) when no reply came."""
        parts = urlsplit(url)
        origin = (parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": USER_AGENT, **headers}
        if not self._slots.acquire(timeout=self._timeout_s):
            raise TransportFailure(
                Outcome.NOT_SENT, f"request to {origin[1]}:{origin[2]} not sent: all connections busy"
            )
        try:
            connection = self._take(origin)
            if connection is not None:
                try:
                    return self._exchange(origin, connection, True, target, body, headers)
                except _StaleConnection:
                    pass  # nothing reached the server: once more on a new connection
            return self._exchange(origin, self._open(origin), False, target, body, headers)
        finally:
            self._slots.release()

    def _exchange(
        self,
        origin: tuple[str, str, int],
        connection: http.client.HTTPConnection,
        reused: bool,
        target: str,
        body: bytes,
        headers: Mapping[str, str],
    ) -> HttpReply:
        where = f"{origin[1]}:{origin[2]}"
        try:
            if not reused:
                connection.connect()
            connection.request("POST", target, body=body, headers=headers)
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            if reused:
                raise _StaleConnection from exc
            # refused, DNS, TLS, connect timeout, or the request not fully written: a server
            # cannot act on a request it did not receive whole
            raise TransportFailure(Outcome.NOT_SENT, f"request to {where} not sent: {describe_error(exc)}") from None
        try:
            response = connection.getresponse()
            reply = HttpReply(response.status, response.read())
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise TransportFailure(
                Outcome.AMBIGUOUS, f"request to {where} sent but no reply: {describe_error(exc)}"
            ) from None
        if response.will_close:
            connection.close()
        else:
            self._give_back(origin, connection)
        return reply

    def _open(self, origin: tuple[str, str, int]) -> http.client.HTTPConnection:
        scheme, host, port = origin
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self._timeout_s, context=self._tls)
        return http.client.HTTPConnection(host, port, timeout=self._timeout_s)

    def _take(self, origin: tuple[str, str, int]) -> http.client.HTTPConnection | None:
        """An idle connection that is still good, or None."""
        while True:
            with self._lock:
                idle = self._idle.get(origin)
                if not idle:
                    return None
                connection, idle_since = idle.pop()
            # expired, or readable while idle: the server closed it (or said something unasked)
            sock = connection.sock
            if (
                sock is None
                or time.monotonic() - idle_since > KEEPALIVE_EXPIRY_S
                or select.select([sock], [], [], 0)[0]
            ):
                connection.close()
                continue
            return connection

    def _give_back(self, origin: tuple[str, str, int], connection: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if not self._closed and len(idle) < self._max_idle:
                idle.append((connection, time.monotonic()))
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection, _ in connections:
                connection.close()


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


def post_and_classify(
    client: HttpClient,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    message_id: Callable[[HttpReply], str | None],
    also_accepted: Collection[int] = (),
) -> SendResult:
    """POST and turn what happened into a SendResult; `message_id` picks the id from an accepted reply."""
    try:
        reply = client.post(url, body, headers)
    except TransportFailure as failure:
        return SendResult.failed(failure.outcome, failure.error, {"url": url})
    outcome = outcome_for_status(reply.status, also_accepted)
    if outcome is Outcome.ACCEPTED:
        return SendResult.accepted(message_id(reply), reply.summary())
    return SendResult.failed(outcome, f"HTTP {reply.status}: {_error_detail(reply)}", reply.summary())


def _error_detail(reply: HttpReply) -> str:
    parsed = reply.json()
    if isinstance(parsed, dict):
        for key in ("message", "error", "detail"):
            if parsed.get(key):
                return str(parsed[key])
    return reply.body.decode("utf-8", "replace")[:200] or "(empty body)"
