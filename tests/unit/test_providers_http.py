"""The HTTP adapters' connections, against real servers on 127.0.0.1: reuse, pool size, stale
keep-alive connections, and where each failure falls on the NOT_SENT / AMBIGUOUS boundary."""

from __future__ import annotations

import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from kernel_driver.providers import OutboundItem, Outcome, ProviderAdapter, SendResult, open_adapter
from kernel_driver.providers.twilio import TwilioAdapter
from kernel_driver.providers.webhook import WebhookAdapter
from kernel_driver.testing.sinks import VoiceSink, WebhookSink

TOKEN_ENV = "VOICE_TOKEN"
BIG = 16 * 1024 * 1024  # more than the socket buffers hold: a reset arrives while it is written


def email(text: str = "Hello") -> OutboundItem:
    return OutboundItem(
        str(uuid.uuid4()), f"root:email:{uuid.uuid4()}:1", "email", "ann@example.com",
        {"subject": "Hi", "text": text}, str(uuid.uuid4()), str(uuid.uuid4()),
    )  # fmt: skip


def call() -> OutboundItem:
    return OutboundItem(
        str(uuid.uuid4()), f"root:voice:{uuid.uuid4()}:1", "voice", "+15551230001",
        {"script": "Your order has shipped."}, str(uuid.uuid4()), str(uuid.uuid4()),
    )  # fmt: skip


def webhook(sink: WebhookSink, concurrency: int = 8, timeout_s: float = 2) -> WebhookAdapter:
    return WebhookAdapter({**sink.provider_settings(), "timeout_s": timeout_s}, concurrency=concurrency)


def twilio(sink: VoiceSink, timeout_s: float = 2) -> TwilioAdapter:
    settings = {**sink.provider_settings(auth_token_env=TOKEN_ENV), "timeout_s": timeout_s}
    return TwilioAdapter(settings, {TOKEN_ENV: sink.auth_token})


def send_later(adapter: ProviderAdapter, item: OutboundItem, timeout_s: float = 10) -> SendResult:
    """The daemon's way: start the call, wait for the callback."""
    results: list[SendResult] = []
    done = threading.Event()

    def finished(result: SendResult) -> None:
        results.append(result)
        done.set()

    assert adapter.send_later(item, finished)
    assert done.wait(timeout_s), "send_later never called back"
    return results[0]


SENDS = {"send": lambda adapter, item: adapter.send(item), "send_later": send_later}
VIA = pytest.mark.parametrize("via", list(SENDS))


def test_send_later_returns_before_the_reply():
    with WebhookSink() as sink, webhook(sink) as adapter:
        sink.slow_ms = 300
        results: list[SendResult] = []
        done = threading.Event()
        item = email()

        started = adapter.send_later(item, lambda result: (results.append(result), done.set()))

        assert started and not done.is_set()  # the reply is 300 ms away: nothing waited for it
        assert done.wait(10)
    assert results[0].outcome is Outcome.ACCEPTED
    assert list(sink.deliveries_by_key) == [item.idempotency_key]


def test_send_later_refuses_a_channel_the_adapter_does_not_serve():
    with VoiceSink() as sink, twilio(sink) as adapter:
        result = send_later(adapter, email())
    assert result.outcome is Outcome.REJECTED and "does not serve channel 'email'" in (result.error or "")
    assert not sink.calls


@VIA
def test_a_call_in_flight_when_the_adapter_closes_is_ambiguous_not_raised(via):
    send = SENDS[via]
    with WebhookSink() as sink:
        sink.slow_ms = 1000
        adapter = webhook(sink, timeout_s=5)
        results: list[SendResult] = []
        caller = threading.Thread(target=lambda: results.append(send(adapter, email())))
        caller.start()
        while not sink.connections:  # the request is on its way
            time.sleep(0.01)
        adapter.close()
        caller.join(10)

    assert [r.outcome for r in results] == [Outcome.AMBIGUOUS]
    assert "abandoned: the client closed" in (results[0].error or "")


def send_from_threads(adapter: ProviderAdapter, items: list[OutboundItem], threads: int) -> list[SendResult]:
    results: list[SendResult] = []
    lock = threading.Lock()

    def send_share(share: list[OutboundItem]) -> None:
        for item in share:
            result = adapter.send(item)
            with lock:
                results.append(result)

    workers = [threading.Thread(target=send_share, args=(items[n::threads],)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def test_sequential_sends_share_one_connection():
    with WebhookSink() as sink, webhook(sink) as adapter:
        outcomes = {adapter.send(email()).outcome for _ in range(20)}

    assert outcomes == {Outcome.ACCEPTED}
    assert len(sink.deliveries) == 20
    assert sink.connections == 1


def test_twilio_reuses_its_connection_too():
    with VoiceSink() as sink, twilio(sink) as adapter:
        outcomes = {adapter.send(call()).outcome for _ in range(10)}

    assert outcomes == {Outcome.ACCEPTED}
    assert sink.connections == 1


def test_concurrent_sends_keep_at_most_concurrency_connections():
    with WebhookSink() as sink, webhook(sink, concurrency=4) as adapter:
        sink.slow_ms = 20  # so that the threads overlap
        results = send_from_threads(adapter, [email() for _ in range(80)], threads=8)

    assert {result.outcome for result in results} == {Outcome.ACCEPTED}
    assert len(sink.deliveries_by_key) == 80 and sink.duplicate_attempts == 0
    assert 1 < sink.connections <= 4  # eight threads, four connections, each used about 20 times


@VIA
def test_a_connection_the_server_closed_while_idle_is_replaced(via):
    send = SENDS[via]
    with WebhookSink(idle_timeout_s=0.2) as sink, webhook(sink) as adapter:
        first = send(adapter, email())
        time.sleep(0.5)  # the server closes the idle connection; the pool has not expired it yet
        second = send(adapter, email())

    assert (first.outcome, second.outcome) == (Outcome.ACCEPTED, Outcome.ACCEPTED)
    assert sink.connections == 2


@VIA
def test_a_reset_before_the_request_is_written_retries_once_on_a_new_connection(via):
    send = SENDS[via]
    with WebhookSink() as sink, webhook(sink) as adapter:
        assert send(adapter, email()).outcome is Outcome.ACCEPTED
        sink.drop_reused_first_n = 1  # the kept-alive connection is reset when the next request comes
        item = email("x" * BIG)

        result = send(adapter, item)

    assert result.outcome is Outcome.ACCEPTED, result.error
    assert sink.drop_reused_first_n == 0  # the fault did hit
    assert sink.connections == 2
    assert item.idempotency_key in sink.deliveries_by_key and sink.duplicate_attempts == 0


@VIA
def test_a_reset_after_the_request_was_written_is_ambiguous(via):
    send = SENDS[via]
    with VoiceSink() as sink, twilio(sink) as adapter:
        sink.reset_first_n = 1

        lost = send(adapter, call())
        after = send(adapter, call())

    assert lost.outcome is Outcome.AMBIGUOUS  # twilio does not deduplicate: this ends `unknown`
    assert "sent but no reply" in (lost.error or "")
    assert after.outcome is Outcome.ACCEPTED
    assert len(sink.calls) == 2  # the lost call was placed


def test_a_lost_webhook_answer_is_resent_and_deduplicated_by_the_receiver():
    with WebhookSink() as sink, webhook(sink) as adapter:
        sink.reset_first_n = 1
        item = email()

        lost, resent = adapter.send(item), adapter.send(item)

    assert (lost.outcome, resent.outcome) == (Outcome.AMBIGUOUS, Outcome.ACCEPTED)
    assert list(sink.deliveries_by_key) == [item.idempotency_key]
    assert sink.duplicate_attempts == 1


@VIA
def test_refused_after_the_sink_stops_listening_is_not_sent(via):
    send = SENDS[via]
    with WebhookSink() as sink, webhook(sink) as adapter:
        assert send(adapter, email()).outcome is Outcome.ACCEPTED
        sink.refuse()  # also ends the kept-alive connection

        refused = send(adapter, email())

        sink.start()
        again = send(adapter, email())

    assert refused.outcome is Outcome.NOT_SENT, (refused, sink.connections, len(sink.deliveries))
    assert "ConnectionRefusedError" in (refused.error or "")
    assert again.outcome is Outcome.ACCEPTED


@contextmanager
def raw_server(serve: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that runs `serve` on each accepted connection; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stopping = threading.Event()

    def accept_loop() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        thread.join()
        listener.close()


def reset(connection: socket.socket) -> None:
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


def read_request(connection: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    header = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    length = int(header.split(b":")[1])
    while len(body) < length:
        body += connection.recv(65536)


@VIA
def test_a_write_failure_on_a_new_connection_is_not_sent(via):
    send = SENDS[via]
    def reset_on_first_bytes(connection: socket.socket) -> None:
        connection.recv(1)
        reset(connection)

    with raw_server(reset_on_first_bytes) as port:
        adapter = WebhookAdapter({"url": f"http://127.0.0.1:{port}/hook", "timeout_s": 2})
        result = send(adapter, email("x" * BIG))

    assert result.outcome is Outcome.NOT_SENT, result.error


@pytest.mark.parametrize(
    "reply",
    [b"this is not HTTP\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"id\": "],
    ids=["garbage", "cut short"],
)
@VIA
def test_a_malformed_reply_is_ambiguous(reply, via):
    send = SENDS[via]
    def answer_badly(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(reply)
        connection.close()

    with raw_server(answer_badly) as port:
        adapter = WebhookAdapter({"url": f"http://127.0.0.1:{port}/hook", "timeout_s": 2})
        result = send(adapter, email())

    assert result.outcome is Outcome.AMBIGUOUS, result.error


class OldStyleAdapter(ProviderAdapter):
    """An adapter written for kernel 1.0: its __init__ does not know `concurrency`."""

    name = "old"
    channels = frozenset({"email"})

    def __init__(self, settings: Any, environ: Any = None) -> None:
        super().__init__(settings, environ or {})

    def deliver(self, item: OutboundItem) -> SendResult:
        return SendResult.accepted("x", {})


def test_open_adapter_passes_the_concurrency(monkeypatch):
    import kernel_driver.providers.base as base

    adapter = open_adapter("webhook", {"url": "http://127.0.0.1:9/hook"}, concurrency=64)
    assert adapter.concurrency == 64
    assert WebhookAdapter({"url": "http://127.0.0.1:9/hook"}).concurrency == 8  # the old way

    monkeypatch.setattr(base, "load_adapter", lambda name: OldStyleAdapter)
    old = base.open_adapter("old", {}, concurrency=64)
    assert isinstance(old, OldStyleAdapter) and old.concurrency == 8
