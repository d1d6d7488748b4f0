"""E-mail through any SMTP server, with the stdlib's smtplib."""

from __future__ import annotations

import os
import re
import smtplib
import ssl
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, parseaddr
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

SMTP_ERRORS = (OSError, smtplib.SMTPException)


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

    def __init__(self, settings: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> None:
        super().__init__(settings, environ)
        self._username = self.secret("username_env")
        self._password = self.secret("password_env")
        self._sender = parseaddr(self.settings["from"])[1]
        self._tls = self._tls_context() if self.settings["ssl"] or self.settings["starttls"] else None
        self._pool = _ConnectionPool(self._open_connection)

    def message_id(self, idempotency_key: str) -> str:
        """The Message-ID header for a key: the same key always gives the same Message-ID."""
        return f"<{key_digest(idempotency_key)}@{self._sender.rsplit('@', 1)[1]}>"

    def deliver(self, item: OutboundItem) -> SendResult:
        try:
            data = self._message_bytes(item)
        except ValueError as exc:
            return SendResult.failed(Outcome.REJECTED, f"cannot build the message: {exc}")
        message_id = self.message_id(item.idempotency_key)
        try:
            connection, reused = self._pool.take()
            try:
                return self._transact(connection, reused, item.recipient, data, message_id)
            except _StaleSession:
                return self._transact(self._pool.open(), False, item.recipient, data, message_id)
        except SMTP_ERRORS as exc:  # from opening a session: connect, EHLO, STARTTLS, AUTH
            return self._session_failure(exc)

    def close(self) -> None:
        self._pool.close()

    def _message_bytes(self, item: OutboundItem) -> bytes:
        subject, body, html = (item.content.get(k) for k in ("subject", "text", "html"))
        if not subject or not body:
            raise ValueError("e-mail content needs a non-empty 'subject' and 'text'")
        if not item.recipient.isascii() or "@" not in item.recipient:
            raise ValueError(f"recipient {item.recipient!r} is not an ASCII e-mail address")
        message = EmailMessage()
        message["From"] = self.settings["from"]
        message["To"] = item.recipient
        message["Subject"] = subject
        message["Date"] = format_datetime(datetime.now(UTC))
        message["Message-ID"] = self.message_id(item.idempotency_key)
        message["X-Idempotency-Key"] = item.idempotency_key
        message.set_content(body)
        if html:
            message.add_alternative(html, subtype="html")
        return message.as_bytes(policy=SMTP_POLICY)

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
                connection.login(self._username, self._password or "")
        except BaseException:
            connection.close()
            raise
        return connection

    def _transact(
        self, connection: smtplib.SMTP, reused: bool, recipient: str, data: bytes, message_id: str
    ) -> SendResult:
        """MAIL, RCPT, DATA on an open session; _StaleSession if a reused one was dead before MAIL."""
        phase = "MAIL"
        try:
            code, reply = connection.mail(self._sender)
            if 200 <= code < 300:
                phase = "RCPT"
                code, reply = connection.rcpt(recipient)
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
        except SMTP_ERRORS as exc:
            self._pool.discard(connection)
            if phase == "end of data":
                return SendResult.failed(
                    Outcome.AMBIGUOUS,
                    f"message sent but the server's answer was lost: {describe_error(exc)}",
                    {"smtp_phase": phase},
                )
            if reused and phase == "MAIL":
                raise _StaleSession from exc
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
        # a 5xx greeting or AUTH answer, or a missing extension, will not change by retrying
        permanent = (isinstance(code, int) and 500 <= code < 600) or isinstance(
            exc, smtplib.SMTPNotSupportedError
        )
        return SendResult.failed(Outcome.REJECTED if permanent else Outcome.NOT_SENT, error, response)


class _StaleSession(Exception):
    """A pooled session the server had closed meanwhile: nothing was sent, open a fresh one."""


class _ConnectionPool:
    """Idle SMTP sessions shared by threads: a send takes one for itself, then gives it back."""

    def __init__(self, open_connection: Callable[[], smtplib.SMTP]) -> None:
        self.open = open_connection
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
            if not self._closed:
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
