"""One HTTP POST, classified: the plumbing the twilio and webhook adapters share.

http.client rather than urllib.request because the classification depends on *when* a failure
happened: before the request was fully written nothing can have been acted on (NOT_SENT); after
it, the provider may have acted and its answer was lost (AMBIGUOUS). urllib hides that boundary.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kernel_driver.providers.base import Outcome, SendResult, describe_error

BODY_EXCERPT_CHARS = 2000
USER_AGENT = "kernel-driver"


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


def post(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> HttpReply:
    """POST `body` to `url`; raise TransportFailure (NOT_SENT or AMBIGUOUS) when no reply came."""
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname or "", parts.port, timeout=timeout_s)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    where = f"{parts.hostname}:{connection.port}"
    try:
        try:
            connection.connect()
            connection.request("POST", target, body=body, headers={"User-Agent": USER_AGENT, **headers})
        except OSError as exc:
            # refused, DNS, TLS, connect timeout, or the request not fully written: a server
            # cannot act on a request it did not receive whole
            raise TransportFailure(
                Outcome.NOT_SENT, f"request to {where} not sent: {describe_error(exc)}"
            ) from None
        try:
            response = connection.getresponse()
            return HttpReply(response.status, response.read())
        except (OSError, http.client.HTTPException) as exc:
            raise TransportFailure(
                Outcome.AMBIGUOUS, f"request to {where} sent but no reply: {describe_error(exc)}"
            ) from None
    finally:
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
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout_s: float,
    message_id: Callable[[HttpReply], str | None],
    also_accepted: Collection[int] = (),
) -> SendResult:
    """POST and turn what happened into a SendResult; `message_id` picks the id from an accepted reply."""
    try:
        reply = post(url, body, headers, timeout_s)
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
