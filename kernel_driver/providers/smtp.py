"""E-mail through any SMTP server, with the stdlib's smtplib.

What goes out is announced (RFC 6152 BODY=8BITMIME for 8-bit content, RFC 6531 SMTPUTF8 for a
non-ASCII local part); a message the server cannot take as it is is re-encoded 7-bit
(quoted-printable or base64) or, when that cannot help, refused before MAIL. Every failure before
the message data went out is NOT_SENT or REJECTED, never AMBIGUOUS: nothing can have been delivered.
"""

from __future__ import annotations

import base64
import logging
import re
import smtplib
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, formataddr, parseaddr
from typing import Any

from kernel_driver.providers.base import (
    OutboundItem,
    Outcome,
    ProviderAdapter,
    ProviderConfigError,
    SendResult,
    describe_error,
    key_digest,
)
from kernel_driver.providers.settings import (
    Setting,
    boolean,
    email_address,
    env_name,
    positive_number,
    tcp_port,
    text,
)

log = logging.getLogger(__name__)

SMTP_ERRORS = (OSError, smtplib.SMTPException)
# The key goes out on one raw header line (never folded or encoded, so that the raw message shows
# it): printable ASCII, short enough for the 998-character line limit of RFC 5322.
RAW_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,900}[\x21-\x7e])?")


@dataclass(frozen=True)
class _Envelope:
    sender: str
    recipient: str
    utf8: bool  # a local part is not ASCII: only a server offering SMTPUTF8 can take it


class _Unsendable(Exception):
    """This server cannot take this message (a missing extension): REJECTED, nothing was sent."""


class SmtpAdapter(ProviderAdapter):
    """One message per item, Message-ID derived from the idempotency key.

    SMTP servers do not deduplicate by Message-ID, so an AMBIGUOUS message ends `unknown`.
    Connections are pooled: each concurrent `send` takes its own and gives it back.
    """

    name = "smtp"
    channels = frozenset({"email"})
    deduplicates = False
    settings_schema = {
        "host": Setting(text, required=True),
        "port": Setting(tcp_port, required=True),
        "from": Setting(email_address, required=True),
        "starttls": Setting(boolean, default=False),
        "ssl": Setting(boolean, default=False),
        "username_env": Setting(env_name),
        "password_env": Setting(env_name),
        "timeout_s": Setting(positive_number, default=10),
        "ca_file": Setting(text),  # PEM bundle to trust instead of the system's (a private CA)
    }

    @classmethod
    def validate_settings(cls, settings: Mapping[str, Any]) -> list[str]:
        problems = super().validate_settings(settings)
        if not isinstance(settings, Mapping):
            return problems
        if settings.get("ssl") is True and settings.get("starttls") is True:
            problems.append(
                "smtp settings 'ssl' and 'starttls' cannot both be true: 'ssl' speaks TLS from "
                "the first byte (usually port 465), 'starttls' upgrades a plain connection (587)"
            )
        if bool(settings.get("username_env")) != bool(settings.get("password_env")):
            problems.append(
                "smtp settings 'username_env' and 'password_env' go together: set both or neither"
            )
        return problems

    def prepare(self) -> None:
        self._username = self.secret("username_env")
        self._password = self.secret("password_env")
        display_name, address = parseaddr(self.settings["from"])
        try:
            self._sender, self._sender_utf8 = _smtp_address(address)
        except ValueError as exc:
            raise ProviderConfigError(f"smtp setting 'from' cannot be used: {exc}") from exc
        self._display_name = display_name
        self._tls = self._tls_context() if self.settings["ssl"] or self.settings["starttls"] else None
        self._pool = _ConnectionPool(self._open_connection, max_idle=self.concurrency)

    def message_id(self, idempotency_key: str) -> str:
        """The Message-ID header for a key: the same key always gives the same Message-ID."""
        return f"<{key_digest(idempotency_key)}@{self._sender.rsplit('@', 1)[1]}>"

    def deliver(self, item: OutboundItem) -> SendResult:
        try:
            envelope = self._envelope(item.recipient)
            data = self._message_bytes(item, envelope, eight_bit=True)
        except ValueError as exc:  # also UnicodeError
            return SendResult.failed(Outcome.REJECTED, f"cannot build the message: {exc}")
        try:
            connection, reused = self._pool.take()
        except Exception as exc:  # connect, EHLO, STARTTLS, AUTH: before MAIL, nothing was sent
            return self._session_failure(exc)
        try:
            return self._transact(connection, reused, item, envelope, data)
        except _StaleSession:
            try:
                connection = self._pool.open()
            except Exception as exc:
                return self._session_failure(exc)
            return self._transact(connection, False, item, envelope, data)

    def close(self) -> None:
        self._pool.close()

    def _envelope(self, recipient: str) -> _Envelope:
        address, utf8 = _smtp_address(recipient)
        return _Envelope(self._sender, address, utf8 or self._sender_utf8)

    def _message_bytes(self, item: OutboundItem, envelope: _Envelope, eight_bit: bool) -> bytes:
        """The message; with eight_bit=False, 7-bit clean (quoted-printable or base64 bodies)."""
        subject, body, html = (item.content.get(k) for k in ("subject", "text", "html"))
        if not subject or not body:
            raise ValueError("e-mail content needs a non-empty 'subject' and 'text'")
        if not RAW_HEADER_VALUE.fullmatch(item.idempotency_key):
            raise ValueError("the idempotency key must be printable ASCII to go on one header line")
        policy = SMTP_POLICY.clone(utf8=envelope.utf8, cte_type="8bit" if eight_bit else "7bit")
        message = EmailMessage(policy=policy)
        # strings, not headerregistry.Address, which refuses a non-ASCII local part even for SMTPUTF8
        message["From"] = formataddr((self._display_name, envelope.sender))
        message["To"] = envelope.recipient
        message["Subject"] = subject
        message["Date"] = format_datetime(datetime.now(UTC))
        message["Message-ID"] = self.message_id(item.idempotency_key)
        message.set_content(body)
        if html:
            message.add_alternative(html, subtype="html")
        # written by hand: the email package folds a long value into encoded words
        key_header = b"X-Idempotency-Key: " + item.idempotency_key.encode("ascii") + b"\r\n"
        return key_header + message.as_bytes(policy=policy)

    def _fit(
        self, connection: smtplib.SMTP, item: OutboundItem, envelope: _Envelope, data: bytes
    ) -> tuple[bytes, list[str]]:
        """The message as this server can take it, and the MAIL parameters that announce it."""
        options = []
        if envelope.utf8:
            if not connection.has_extn("smtputf8"):
                raise _Unsendable(
                    f"the server does not offer SMTPUTF8, which the address {envelope.recipient!r} "
                    f"or {envelope.sender!r} needs (a non-ASCII local part)"
                )
            options.append("SMTPUTF8")
        if not data.isascii():
            if connection.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            elif envelope.utf8:
                raise _Unsendable("the server offers SMTPUTF8 but not 8BITMIME, which SMTPUTF8 needs")
            else:
                data = self._message_bytes(item, envelope, eight_bit=False)
        return data, options

    def _tls_context(self) -> ssl.SSLContext:
        try:
            return ssl.create_default_context(cafile=self.settings["ca_file"])
        except (OSError, ssl.SSLError) as exc:
            raise ProviderConfigError(
                f"smtp setting 'ca_file' {self.settings['ca_file']!r} cannot be used: {describe_error(exc)}"
            ) from exc

    def _open_connection(self) -> smtplib.SMTP:
        host, port, timeout = self.settings["host"], self.settings["port"], self.settings["timeout_s"]
        if self.settings["ssl"]:
            connection: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=timeout, context=self._tls)
        else:
            connection = smtplib.SMTP(host, port, timeout=timeout)
        try:
            connection.ehlo()
            if self.settings["starttls"]:
                connection.starttls(context=self._tls)
                connection.ehlo()
            if self._username:
                _login(connection, self._username, self._password or "")
        except BaseException:
            connection.close()
            raise
        return connection

    def _transact(
        self, connection: smtplib.SMTP, reused: bool, item: OutboundItem, envelope: _Envelope, data: bytes
    ) -> SendResult:
        """MAIL, RCPT, DATA on an open session; _StaleSession if a reused one was dead before MAIL."""
        message_id = self.message_id(item.idempotency_key)
        try:
            data, options = self._fit(connection, item, envelope, data)
        except (_Unsendable, ValueError) as exc:
            self._pool.give_back(connection)
            return SendResult.failed(Outcome.REJECTED, f"cannot send the message: {exc}", {"smtp_phase": "EHLO"})
        phase = "MAIL"
        try:
            connection.command_encoding = "ascii"  # smtplib sets utf-8 for SMTPUTF8 and never resets it
            code, reply = connection.mail(envelope.sender, options)
            if 200 <= code < 300:
                phase = "RCPT"
                code, reply = connection.rcpt(envelope.recipient)
            if 200 <= code < 300:
                phase = "DATA"
                connection.putcmd("data")
                code, reply = connection.getreply()
            if code == 354:
                # smtplib's data() is not used because it hides whether a failure came
                # before the message went out (NOT_SENT) or after (AMBIGUOUS)
                connection.send(_dot_stuffed(data))
                phase = "end of data"
                code, reply = connection.getreply()
        except Exception as exc:
            self._pool.discard(connection)
            if not isinstance(exc, SMTP_ERRORS):
                log.warning("smtp: unexpected %s at %s", describe_error(exc), phase, extra={"item_id": item.id})
            if phase == "end of data":
                return SendResult.failed(
                    Outcome.AMBIGUOUS,
                    f"message sent but the server's answer was lost: {describe_error(exc)}",
                    {"smtp_phase": phase},
                )
            if reused and phase == "MAIL" and isinstance(exc, SMTP_ERRORS):
                raise _StaleSession from exc
            # the final "." had not gone out: the server cannot have accepted the message
            return SendResult.failed(
                Outcome.NOT_SENT,
                f"SMTP session failed at {phase}: {describe_error(exc)}",
                {"smtp_phase": phase},
            )

        response = {"smtp_phase": phase, "smtp_code": code, "smtp_reply": _text(reply)}
        if phase == "end of data" and 200 <= code < 300:
            self._pool.give_back(connection)
            return SendResult.accepted(message_id, response)
        self._pool.reset_and_give_back(connection)
        error = f"SMTP {phase} answered {code} {response['smtp_reply']}"
        if 500 <= code < 600:
            return SendResult.failed(Outcome.REJECTED, error, response)
        if 400 <= code < 500 or phase != "end of data":
            return SendResult.failed(Outcome.NOT_SENT, error, response)
        return SendResult.failed(Outcome.AMBIGUOUS, error, response)  # a garbled final reply

    def _session_failure(self, exc: BaseException) -> SendResult:
        where = f"{self.settings['host']}:{self.settings['port']}"
        error = f"cannot open an SMTP session with {where}: {describe_error(exc)}"
        code = getattr(exc, "smtp_code", None)
        response: dict[str, Any] = {}
        if isinstance(code, int):
            reply = getattr(exc, "smtp_error", b"")
            response = {"smtp_phase": "session", "smtp_code": code, "smtp_reply": _text(reply)}
        if not isinstance(exc, (*SMTP_ERRORS, UnicodeError)):
            log.warning("smtp: unexpected %s opening a session", describe_error(exc))
        # a 5xx greeting or AUTH answer, a missing extension (STARTTLS, AUTH) or credentials that
        # cannot be encoded will not change by retrying: a configuration error
        permanent = (isinstance(code, int) and 500 <= code < 600) or isinstance(
            exc, smtplib.SMTPNotSupportedError | UnicodeError
        )
        return SendResult.failed(Outcome.REJECTED if permanent else Outcome.NOT_SENT, error, response)


class _StaleSession(Exception):
    """A pooled session the server had closed meanwhile: nothing was sent, open a fresh one."""


class _ConnectionPool:
    """Idle SMTP sessions shared by threads: a send takes one for itself, then gives it back."""

    def __init__(self, open_connection: Callable[[], smtplib.SMTP], max_idle: int) -> None:
        self.open = open_connection
        self._max_idle = max_idle  # no more sessions kept than sends run at once
        self._idle: list[smtplib.SMTP] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> tuple[smtplib.SMTP, bool]:
        """A session and whether it was reused (it may have been closed by the server since)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self.open(), False

    def give_back(self, connection: smtplib.SMTP) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(connection)
                return
        _quit(connection)

    def reset_and_give_back(self, connection: smtplib.SMTP) -> None:
        """After a refused transaction: RSET so that the session can carry the next message."""
        try:
            code, _ = connection.rset()
        except SMTP_ERRORS:
            code = 0
        if code == 250:
            self.give_back(connection)
        else:
            self.discard(connection)

    def discard(self, connection: smtplib.SMTP) -> None:
        connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            _quit(connection)


def _smtp_address(address: str) -> tuple[str, bool]:
    """`address` for MAIL/RCPT and the headers, its domain in IDNA; and whether it needs SMTPUTF8."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c.isspace() or not c.isprintable() or c in "<>," for c in address):
        raise ValueError(f"{address!r} is not an e-mail address")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")  # bücher.example -> xn--bcher-kva.example
        except UnicodeError as exc:
            raise ValueError(f"the domain of {address!r} cannot be written in IDNA: {exc}") from None
    return f"{local}@{domain}", not local.isascii()


def _login(connection: smtplib.SMTP, username: str, password: str) -> None:
    """AUTH PLAIN or LOGIN with UTF-8 credentials (RFC 4616); smtplib's login() encodes ASCII only."""
    if not connection.has_extn("auth"):
        raise smtplib.SMTPNotSupportedError("SMTP AUTH extension not supported by server.")
    offered = connection.esmtp_features["auth"].upper().split()
    user = username.encode("utf-8", "surrogateescape")  # a variable's undecodable bytes, as they were
    secret = password.encode("utf-8", "surrogateescape")
    if "PLAIN" in offered:
        code, reply = connection.docmd("AUTH", "PLAIN " + _b64(b"\0" + user + b"\0" + secret))
    elif "LOGIN" in offered:
        code, reply = connection.docmd("AUTH", "LOGIN " + _b64(user))
        if code == 334:
            code, reply = connection.docmd(_b64(secret))
    elif username.isascii() and password.isascii():
        connection.login(username, password)  # CRAM-MD5, which smtplib knows
        return
    else:
        raise smtplib.SMTPNotSupportedError(
            f"the server offers AUTH {' '.join(offered)}; non-ASCII credentials need PLAIN or LOGIN"
        )
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, reply)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _quit(connection: smtplib.SMTP) -> None:
    try:
        connection.quit()
    except SMTP_ERRORS:
        connection.close()


def _dot_stuffed(data: bytes) -> bytes:
    """The DATA payload (RFC 5321 4.5.2): lines starting with "." doubled, ended by CRLF.CRLF."""
    stuffed = re.sub(rb"(?m)^\.", b"..", data)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
