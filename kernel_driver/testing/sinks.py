"""Local stand-ins for the providers: a real SMTP server, a Twilio-like voice API, a webhook receiver.

Tests, the demo and the certification harness point the shipped adapters at these sinks. Each
sink listens on 127.0.0.1 on a port the OS picks, records what arrives (thread-safely;
each record has its `received_at`, a time.monotonic()), and has fault modes that can be switched
at any time to provoke each outcome:

    with SmtpSink() as sink:
        sink.reject_rcpt = {"bounce@example.com"}     # or True for every recipient
        adapter = SmtpAdapter(sink.provider_settings())
        ...
        assert sink.wait_for(3, timeout=2)

A hung answer (hang_after_data, hang, timeout_first_n) is recorded first: it models "the request
arrived, the answer was lost". It is released at stop().
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import re
import socket
import ssl
import struct
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage, Message
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import parse_qs

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from kernel_driver.providers.webhook import SIGNATURE_HEADER, sign

HOST = "127.0.0.1"
HANG_LIMIT_S = 120.0  # a hung answer ends at stop(), or after this long if stop() never comes
RENDEZVOUS_LIMIT_S = 10.0  # a held message waits this long for the others, then passes alone

# Where a fault applies: False (nowhere), True (every recipient) or the recipients it hits.
FaultScope = bool | Collection[str]

T = TypeVar("T")


def refused_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then closed), to provoke refused connections."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _hits(scope: FaultScope, recipients: Collection[str]) -> bool:
    if isinstance(scope, bool):
        return scope
    return any(recipient in scope for recipient in recipients)


class _Recorder(Generic[T]):
    """A list that threads append to and tests wait on."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._changed = threading.Condition()

    def add(self, item: T) -> None:
        with self._changed:
            self._items.append(item)
            self._changed.notify_all()

    def items(self) -> list[T]:
        with self._changed:
            return list(self._items)

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self._items) >= count, timeout)


class _Sink(ABC, Generic[T]):
    title: str

    def __init__(self) -> None:
        self._recorder: _Recorder[T] = _Recorder()

    @abstractmethod
    def start(self) -> Any: ...

    @abstractmethod
    def stop(self) -> None: ...

    @property
    @abstractmethod
    def url(self) -> str: ...

    @abstractmethod
    def provider_settings(self) -> dict[str, Any]:
        """Adapter settings that point at this sink."""

    @abstractmethod
    def faults(self) -> dict[str, Any]:
        """The fault modes and their current values, as describe() shows them."""

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until `count` items have been received; False if `timeout` seconds pass first."""
        return self._recorder.wait_for(count, timeout)

    def describe(self) -> str:
        active = ", ".join(f"{name}={value}" for name, value in self.faults().items() if value)
        return (
            f"{self.title} at {self.url}: {len(self._recorder.items())} received; "
            f"faults: {active or 'none'}\nprovider settings: {json.dumps(self.provider_settings())}"
        )

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _scope_text(scope: FaultScope) -> str:
    if isinstance(scope, bool):
        return "all" if scope else ""
    return ",".join(sorted(scope))


# ---------------------------------------------------------------------------------------- SMTP


@dataclass(frozen=True)
class SmtpMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message_id: str | None
    headers: dict[str, str]
    subject: str | None
    text: str | None
    html: str | None
    peer: tuple[str, int]  # the client's end of the connection: one per SMTP session
    raw: bytes
    received_at: float = field(default_factory=time.monotonic)
    mail_options: tuple[str, ...] = ()  # the MAIL FROM parameters, upper case: ("BODY=8BITMIME",)


class _EphemeralPortController(Controller):
    """aiosmtpd's Controller on a port the OS picks: it learns the port once it is bound."""

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class SmtpSink(_Sink[SmtpMessage]):
    """A real SMTP server (aiosmtpd) that keeps every message it accepts.

    Faults, each a FaultScope: `reject_rcpt` (550 at RCPT), `temp_fail` (451 at RCPT),
    `hang_after_data` (receive the message, then never answer: the client times out).
    `credentials=(user, password)` requires AUTH before MAIL (without TLS: it is a local sink).
    `rendezvous=n` holds the answer to each message until n messages have arrived (then lets
    every message pass): clients that each send one message at a time must all be sending at
    once, which certify's Q1 uses to make two daemons race for certain.
    `idle_timeout_s` closes idle sessions, as real servers do. `tls="starttls"` or `"ssl"`
    with `certificate=(cert_file, key_file)` speaks TLS; provider_settings() then trusts that
    certificate (self-signed, for 127.0.0.1) through the adapter's `ca_file`.
    """

    title = "SMTP sink"

    def __init__(
        self,
        credentials: tuple[str, str] | None = None,
        idle_timeout_s: float = 300,
        tls: Literal["starttls", "ssl"] | None = None,
        certificate: tuple[str, str] | None = None,
        eight_bit_mime: bool = True,
        smtputf8: bool = False,
        auth_mechanisms: Collection[str] = ("LOGIN", "PLAIN"),
        rendezvous: int = 0,
    ) -> None:
        super().__init__()
        if bool(tls) != bool(certificate):
            raise ValueError("SmtpSink: tls and certificate go together")
        self.reject_rcpt: FaultScope = False
        self.temp_fail: FaultScope = False
        self.hang_after_data: FaultScope = False
        self._credentials = credentials
        self._idle_timeout_s = idle_timeout_s
        self._tls = tls
        self._certificate = certificate
        self._eight_bit_mime = eight_bit_mime
        self._smtputf8 = smtputf8
        self._auth_mechanisms = {m.upper() for m in auth_mechanisms}
        self._rendezvous = rendezvous
        self._all_arrived = asyncio.Event()
        self._controller: _EphemeralPortController | None = None

    def start(self) -> SmtpSink:
        auth: dict[str, Any] = {}
        if self._credentials:
            # AUTH without TLS is fine on a local sink; handle_MAIL requires it (aiosmtpd's own
            # auth_required would warn about the missing TLS on every connection)
            auth = {
                "authenticator": self._authenticate,
                "auth_require_tls": False,
                "auth_exclude_mechanism": {"LOGIN", "PLAIN"} - self._auth_mechanisms,
            }
        tls: dict[str, Any] = {}
        if self._certificate:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self._certificate)
            tls = {"tls_context": context} if self._tls == "starttls" else {"ssl_context": context}
        self._controller = _EphemeralPortController(
            self, hostname=HOST, port=0, timeout=self._idle_timeout_s, enable_SMTPUTF8=self._smtputf8,
            **auth, **tls,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()  # also cancels hung DATA handlers
            self._controller = None

    @property
    def port(self) -> int:
        assert self._controller is not None, "the sink is not started"
        return self._controller.port

    @property
    def url(self) -> str:
        return f"{'smtps' if self._tls == 'ssl' else 'smtp'}://{HOST}:{self.port}"

    @property
    def messages(self) -> list[SmtpMessage]:
        return self._recorder.items()

    def count_by_recipient(self) -> Counter[str]:
        return Counter(rcpt for message in self.messages for rcpt in message.rcpt_tos)

    def faults(self) -> dict[str, Any]:
        scopes = {
            "reject_rcpt": self.reject_rcpt,
            "temp_fail": self.temp_fail,
            "hang_after_data": self.hang_after_data,
        }
        return {name: _scope_text(scope) for name, scope in scopes.items()}

    def provider_settings(
        self, username_env: str = "SMTP_SINK_USERNAME", password_env: str = "SMTP_SINK_PASSWORD"
    ) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "from": "campaigns@example.com",
            "starttls": self._tls == "starttls",
            "ssl": self._tls == "ssl",
            "timeout_s": 5,
        }
        if self._certificate:
            settings["ca_file"] = self._certificate[0]
        if self._credentials:
            settings.update(username_env=username_env, password_env=password_env)
        return settings

    # aiosmtpd handler hooks

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does when there is no hook
        if not self._eight_bit_mime:
            responses = [line for line in responses if line != "250-8BITMIME"]
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self._credentials and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if not self._eight_bit_mime and "BODY=8BITMIME" in mail_options:
            return "555 5.5.4 BODY=8BITMIME not offered"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if _hits(self.reject_rcpt, [address]):
            return "550 5.1.1 Mailbox unavailable (sink fault reject_rcpt)"
        if _hits(self.temp_fail, [address]):
            return "451 4.3.0 Try again later (sink fault temp_fail)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        assert isinstance(raw, bytes)
        if not self._eight_bit_mime and not raw.isascii():
            return "554 5.6.1 8-bit message data on a 7-bit server (no 8BITMIME)"
        self._recorder.add(_parse_message(envelope, session, raw))
        if not self._all_arrived.is_set():
            if len(self._recorder.items()) >= self._rendezvous:
                self._all_arrived.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_arrived.wait(), RENDEZVOUS_LIMIT_S)
        if _hits(self.hang_after_data, envelope.rcpt_tos):
            await asyncio.sleep(HANG_LIMIT_S)
            return "451 4.3.0 Gave up (sink fault hang_after_data)"
        return "250 OK queued"

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        given = (
            (auth_data.login.decode(), auth_data.password.decode())
            if isinstance(auth_data, LoginPassword)
            else None
        )
        return AuthResult(success=given == self._credentials, handled=False)  # aiosmtpd answers 535


def _parse_message(envelope: Envelope, session: Session, raw: bytes) -> SmtpMessage:
    parsed = message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=default_policy)  # report text with \n
    assert isinstance(parsed, EmailMessage)
    text_part, html_part = parsed.get_body(("plain",)), parsed.get_body(("html",))
    return SmtpMessage(
        mail_from=envelope.mail_from or "",
        rcpt_tos=tuple(envelope.rcpt_tos),
        message_id=parsed["Message-ID"],
        headers={name: str(value) for name, value in parsed.items()},
        subject=parsed["Subject"],
        text=text_part.get_content() if text_part else None,
        html=html_part.get_content() if html_part else None,
        peer=tuple(session.peer[:2]),  # type: ignore[index]  # aiosmtpd says str; it is (host, port)
        raw=raw,
        mail_options=tuple(envelope.mail_options),
    )


# ---------------------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class HttpRequest:
    path: str
    headers: Message  # case-insensitive lookups
    body: bytes


class _SinkHTTPServer(ThreadingHTTPServer):
    # The default listen backlog (5) resets connections when a daemon opens more at once than
    # the accept loop keeps up with on a busy machine; a real provider does not.
    request_queue_size = 128

    def __init__(self, sink: _HttpSink[Any], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__((HOST, sink._port), handler)
        self.daemon_threads = True
        self._sink = sink
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        self._sink._count_connection()
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def end_connections(self) -> None:
        """End every open connection (a request in progress loses its answer)."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            # SHUT_RD alone lets a request that arrives later still be read (Linux)
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _HttpSink(_Sink[T]):
    """A ThreadingHTTPServer answering POSTs through `handle`, with the shared fault modes.

    It speaks HTTP/1.1 with keep-alive; a connection idle for `idle_timeout_s` is closed, as real
    servers do, and `connections` counts the TCP connections accepted.

    force_status: answer every request with this status (500, 429, 409, 202...) and a JSON body
    without an id, processing and recording nothing. status_500 is short for force_status=500.
    slow_ms: answer this late. hang: record, then never answer. timeout_first_n: hang the next
    n requests. reset_first_n: process and record the next n requests, then reset the connection
    without an answer. drop_reused_first_n: the next n requests that come on a kept-alive
    connection find it reset before they are read (a connection the server had closed; nothing
    recorded). refuse(): close the listening socket and end the open connections (connections
    are refused until start()).
    """

    def __init__(self, idle_timeout_s: float = 5.0) -> None:
        super().__init__()
        self.force_status: int | None = None
        self.slow_ms = 0
        self.hang = False
        self.timeout_first_n = 0
        self.reset_first_n = 0
        self.drop_reused_first_n = 0
        self.idle_timeout_s = idle_timeout_s
        self._connections = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._server: _SinkHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0  # 0 until first started; a restart after refuse() reuses the port

    @abstractmethod
    def handle(self, request: HttpRequest) -> tuple[int, dict[str, Any]]:
        """Process and record a request; the status and JSON body to answer."""

    @property
    def status_500(self) -> bool:
        return self.force_status == 500

    @status_500.setter
    def status_500(self, on: bool) -> None:
        self.force_status = 500 if on else None

    def start(self) -> Any:
        handler = type("Handler", (_SinkRequestHandler,), {"sink": self, "timeout": self.idle_timeout_s})
        self._server = _SinkHTTPServer(self, handler)
        self._port = self._server.server_address[1]
        self._released.clear()
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=self.title, daemon=True
        )
        self._thread.start()
        return self

    def refuse(self) -> None:
        """Stop listening and end the open connections: new connections are refused until start()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.end_connections()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = self._thread = None

    def stop(self) -> None:
        self._released.set()
        self.refuse()

    @property
    def port(self) -> int:
        assert self._port, "the sink is not started"
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def connections(self) -> int:
        """TCP connections accepted since the sink was created (across refuse() and start())."""
        with self._lock:
            return self._connections

    def _count_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def _take(self, fault: str) -> bool:
        """Use up one of the `<fault>_first_n` count; False when it is 0."""
        with self._lock:
            left: int = getattr(self, fault)
            setattr(self, fault, max(0, left - 1))
            return left > 0

    def faults(self) -> dict[str, Any]:
        return {
            "force_status": self.force_status,
            "slow_ms": self.slow_ms,
            "hang": self.hang,
            "timeout_first_n": self.timeout_first_n,
            "reset_first_n": self.reset_first_n,
            "drop_reused_first_n": self.drop_reused_first_n,
            "refuse": self._port != 0 and self._server is None,
        }

    def answer(self, request: HttpRequest) -> tuple[int, dict[str, Any]] | Literal["hang", "reset"]:
        """Apply the fault modes around `handle`: a status and body, or how not to answer."""
        if self.force_status:
            return self.force_status, {"status": self.force_status, "message": "forced status (sink fault)"}
        with self._lock:
            hang = self.hang or self.timeout_first_n > 0
            self.timeout_first_n = max(0, self.timeout_first_n - 1)
        reset = not hang and self._take("reset_first_n")
        status, payload = self.handle(request)
        if reset:
            return "reset"
        if hang:
            self._released.wait(HANG_LIMIT_S)
            return "hang"
        if self.slow_ms:
            time.sleep(self.slow_ms / 1000)
        return status, payload


class _SinkRequestHandler(BaseHTTPRequestHandler):
    sink: _HttpSink[Any]
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body go out in two writes: do not hold the second

    def setup(self) -> None:
        super().setup()
        self.requests_served = 0

    def handle_one_request(self) -> None:
        if self.requests_served:
            # StreamRequestHandler reads through makefile("rb") with the default buffering: a BufferedReader
            assert isinstance(self.rfile, io.BufferedReader)
            try:
                arrived = self.rfile.peek(1)  # wait for the client to reuse the connection
            except OSError:  # the idle timeout
                arrived = b""
            if not arrived:
                self.close_connection = True
                return
            # decided once the request is coming, so that the fault may be switched on meanwhile
            if self.sink._take("drop_reused_first_n"):
                self._reset()
                return
        super().handle_one_request()

    def do_POST(self) -> None:
        self.requests_served += 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = self.sink.answer(HttpRequest(self.path, self.headers, body))
        if answer == "reset":
            self._reset()
            return
        if answer == "hang":
            self.close_connection = True
            return
        status, payload = answer
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client stopped waiting (slow_ms past its timeout)

    def _reset(self) -> None:
        """Close the connection with a TCP reset (RST), unread data and all."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()  # the reset goes out once finish() has closed rfile and wfile

    def log_message(self, format: str, *args: Any) -> None:
        pass  # what arrived is in the sink's records


# --------------------------------------------------------------------------------------- voice

CALLS_PATH = re.compile(r"/2010-04-01/Accounts/(?P<sid>[^/]+)/Calls\.json")
E164 = re.compile(r"\+[1-9]\d{6,14}")


@dataclass(frozen=True)
class VoiceCall:
    sid: str
    to: str
    from_: str
    twiml: str
    idempotency_token: str | None
    received_at: float = field(default_factory=time.monotonic)


class VoiceSink(_HttpSink[VoiceCall]):
    """Behaves like the Twilio Calls API: basic auth, 201 with a Call SID, Twilio-style errors.

    Like Twilio it does not deduplicate: every accepted request is a new call.
    """

    title = "voice sink (Twilio Calls API)"

    def __init__(
        self, account_sid: str | None = None, auth_token: str | None = None, idle_timeout_s: float = 5.0
    ) -> None:
        super().__init__(idle_timeout_s)
        self.account_sid = account_sid or "AC" + uuid.uuid4().hex
        self.auth_token = auth_token or "sink-" + uuid.uuid4().hex

    @property
    def calls(self) -> list[VoiceCall]:
        return self._recorder.items()

    def provider_settings(self, auth_token_env: str = "VOICE_SINK_AUTH_TOKEN") -> dict[str, Any]:
        return {
            "base_url": self.url,
            "account_sid": self.account_sid,
            "auth_token_env": auth_token_env,
            "from": "+15550000000",
            "timeout_s": 5,
        }

    def handle(self, request: HttpRequest) -> tuple[int, dict[str, Any]]:
        match = CALLS_PATH.fullmatch(request.path)
        if not match or match["sid"] != self.account_sid:
            return _twilio_error(404, 20404, "The requested resource was not found")
        expected = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if not hmac.compare_digest(request.headers.get("Authorization", ""), expected):
            return _twilio_error(401, 20003, "Authenticate")
        form = {key: values[0] for key, values in parse_qs(request.body.decode()).items()}
        to, caller, twiml = form.get("To", ""), form.get("From", ""), form.get("Twiml", "")
        if not E164.fullmatch(to):
            return _twilio_error(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if not caller:
            return _twilio_error(400, 21603, "A 'From' phone number is required")
        if not twiml:
            return _twilio_error(400, 21205, "Url or Twiml is required")
        call = VoiceCall(
            "CA" + uuid.uuid4().hex, to, caller, twiml, request.headers.get("I-Twilio-Idempotency-Token")
        )
        self._recorder.add(call)
        return 201, {"sid": call.sid, "status": "queued", "to": to, "from": caller}


def _twilio_error(status: int, code: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"status": status, "code": code, "message": message}


# ------------------------------------------------------------------------------------- webhook


@dataclass(frozen=True)
class WebhookDelivery:
    id: str
    idempotency_key: str
    payload: dict[str, Any]
    received_at: float = field(default_factory=time.monotonic)


class WebhookSink(_HttpSink[WebhookDelivery]):
    """Receives the webhook adapter's JSON POSTs and processes each Idempotency-Key once.

    A second request with a known key is answered 200 with the same id and counted in
    `duplicate_attempts`; `deliveries_by_key` holds each key once. With `secret`, requests
    whose signature header does not match are refused with 401.
    """

    title = "webhook sink"

    def __init__(self, secret: str | None = None, idle_timeout_s: float = 5.0) -> None:
        super().__init__(idle_timeout_s)
        self._secret = secret
        self._by_key: dict[str, WebhookDelivery] = {}
        self.duplicate_attempts = 0

    @property
    def deliveries(self) -> list[WebhookDelivery]:
        return self._recorder.items()

    @property
    def deliveries_by_key(self) -> dict[str, WebhookDelivery]:
        with self._lock:
            return dict(self._by_key)

    def provider_settings(self, secret_env: str = "WEBHOOK_SINK_SECRET") -> dict[str, Any]:
        settings: dict[str, Any] = {"url": f"{self.url}/deliveries", "timeout_s": 5}
        if self._secret:
            settings["secret_env"] = secret_env
        return settings

    def handle(self, request: HttpRequest) -> tuple[int, dict[str, Any]]:
        if self._secret and not hmac.compare_digest(
            request.headers.get(SIGNATURE_HEADER, ""), sign(self._secret, request.body)
        ):
            return 401, {"error": "bad signature"}
        key = request.headers.get("Idempotency-Key")
        if not key:
            return 400, {"error": "Idempotency-Key header required"}
        try:
            payload = json.loads(request.body)
        except ValueError:
            return 400, {"error": "body is not JSON"}
        with self._lock:
            known = self._by_key.get(key)
            if known:
                self.duplicate_attempts += 1
                return 200, {"id": known.id, "duplicate": True}
            delivery = self._by_key[key] = WebhookDelivery("wh-" + uuid.uuid4().hex, key, payload)
        self._recorder.add(delivery)
        return 201, {"id": delivery.id, "duplicate": False}
