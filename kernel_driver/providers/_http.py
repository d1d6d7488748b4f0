"""One HTTP POST, classified: the plumbing the twilio and webhook adapters share.

Connections are kept alive and pooled (httpx), one pool per adapter, sized to the daemon's
concurrency. The classification depends on *when* a failure happened: before the request was
fully written nothing can have been acted on (NOT_SENT); after it, the provider may have acted
and its answer was lost (AMBIGUOUS). httpcore hides a write failure behind the read that follows
it (it hopes for an early error reply), so the exception type alone does not tell; httpx's
`trace` request extension does: it reports "http11.send_request_body.complete" once the whole
request is on the wire.
"""

from __future__ import annotations

import http.cookiejar
import json
import ssl
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

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


class _Progress:
    """How far one request got, from httpcore's trace events (one instance per request)."""

    def __init__(self) -> None:
        self.connected = False  # a new TCP connection was opened for it
        self.started = False  # it began writing the request on some connection
        self.written = False  # the whole request was written

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        if event == "connection.connect_tcp.started":
            self.connected = True
        elif event.endswith(".send_request_headers.started"):
            self.started = True
        elif event.endswith(".send_request_body.complete"):
            self.written = True

    @property
    def on_reused_connection(self) -> bool:
        return self.started and not self.connected


class HttpClient:
    """Keep-alive connection pool shared by the threads that call one adapter (httpx is thread-safe)."""

    def __init__(self, timeout_s: float, concurrency: int) -> None:
        limits = httpx.Limits(
            max_connections=concurrency,
            max_keepalive_connections=concurrency,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        )
        self._pooled = self._client(timeout_s, limits)
        # for the one retry after a stale connection: always a new connection
        self._fresh = self._client(timeout_s, httpx.Limits(max_keepalive_connections=0))

    @staticmethod
    def _client(timeout_s: float, limits: httpx.Limits) -> httpx.Client:
        return httpx.Client(
            limits=limits,
            timeout=timeout_s,
            headers={"User-Agent": USER_AGENT},
            verify=ssl.create_default_context(),  # the system's trust store, as before httpx
            trust_env=False,  # no proxy from the environment: the settings name the endpoint
            # each item's request stands alone: a cookie from one reply must not ride on the next
            cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),
        )

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpReply:
        """POST `body` to `url`; raise TransportFailure (NOT_SENT or AMBIGUOUS) when no reply came."""
        try:
            return self._attempt(self._pooled, url, body, headers)
        except _StaleConnection:
            # nothing reached the server; once more on a new connection, so that a connection
            # the server dropped while idle never costs the item a retry (or, worse, `unknown`)
            return self._attempt(self._fresh, url, body, headers)

    def _attempt(self, client: httpx.Client, url: str, body: bytes, headers: Mapping[str, str]) -> HttpReply:
        progress = _Progress()
        try:
            response = client.post(url, content=body, headers=headers, extensions={"trace": progress.trace})
            return HttpReply(response.status_code, response.content)
        except (httpx.HTTPError, OSError) as exc:
            where = _where(url)
            if progress.written:
                raise TransportFailure(
                    Outcome.AMBIGUOUS, f"request to {where} sent but no reply: {_describe(exc)}"
                ) from None
            if progress.on_reused_connection and client is self._pooled:
                raise _StaleConnection from exc
            # refused, DNS, TLS, connect or pool timeout, or the request not fully written:
            # a server cannot act on a request it did not receive whole
            raise TransportFailure(
                Outcome.NOT_SENT, f"request to {where} not sent: {_describe(exc)}"
            ) from None

    def close(self) -> None:
        self._pooled.close()
        self._fresh.close()


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def _describe(exc: BaseException) -> str:
    """httpx's error, with the OS error under it (ConnectionRefusedError, ...) when there is one."""
    shown = describe_error(exc)
    under = exc.__cause__ or exc.__context__  # httpcore chains implicitly
    while under is not None and not isinstance(under, OSError):
        under = under.__cause__ or under.__context__
    if under is not None:
        shown += f" ({type(under).__name__})"
    return shown


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
