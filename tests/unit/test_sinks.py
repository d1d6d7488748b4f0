"""The sinks themselves: recording, waiting, fault modes, refusing and restarting, stopping."""

from __future__ import annotations

import contextlib
import http.client
import smtplib
import socket
import threading
import time

import pytest

from kernel_driver.testing.sinks import SmtpSink, VoiceSink, WebhookSink, refused_port


def post(
    port: int, path: str, body: bytes = b"{}", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_refused_port_refuses():
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", refused_port()), timeout=1)


def test_smtp_sink_records_and_counts_by_recipient():
    with SmtpSink() as sink, smtplib.SMTP("127.0.0.1", sink.port, timeout=2) as client:
        message = b"Subject: hi\r\nMessage-ID: <m1@example.com>\r\n\r\nbody\r\n"
        client.sendmail("from@example.com", ["a@example.com", "b@example.com"], message)
        client.sendmail("from@example.com", ["a@example.com"], message)

        assert sink.wait_for(2, timeout=2)
        assert sink.count_by_recipient() == {"a@example.com": 2, "b@example.com": 1}
        assert sink.messages[0].received_at <= sink.messages[1].received_at <= time.monotonic()
        assert sink.messages[0].message_id == "<m1@example.com>"
        assert sink.messages[0].text == "body\n"


def test_smtp_rendezvous_answers_no_message_until_enough_have_arrived():
    message = b"Subject: hi\r\n\r\nbody\r\n"
    answered: list[float] = []

    def send(recipient: str) -> None:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            client.sendmail("from@example.com", [recipient], message)
            answered.append(time.monotonic())

    with SmtpSink(rendezvous=2) as sink:
        first = threading.Thread(target=send, args=["a@example.com"])
        first.start()
        assert sink.wait_for(1, timeout=2)
        first.join(0.5)
        assert first.is_alive() and answered == []  # held: the second has not arrived
        arrived = time.monotonic()
        send("b@example.com")
        first.join(2)
        assert len(answered) == 2 and min(answered) >= arrived
        send("c@example.com")  # after the rendezvous, messages pass at once
        assert len(answered) == 3


def test_smtp_fault_scopes_hit_only_their_recipients():
    with SmtpSink() as sink, smtplib.SMTP("127.0.0.1", sink.port, timeout=2) as client:
        sink.reject_rcpt = {"gone@example.com"}
        sink.temp_fail = ["busy@example.com"]
        client.ehlo()
        client.mail("f@example.com")

        assert client.rcpt("gone@example.com")[0] == 550
        assert client.rcpt("busy@example.com")[0] == 451
        assert client.rcpt("fine@example.com")[0] == 250


def test_smtp_sink_requires_auth_when_it_has_credentials():
    with (
        SmtpSink(credentials=("user", "pw")) as sink,
        smtplib.SMTP("127.0.0.1", sink.port, timeout=2) as client,
    ):
        client.ehlo()
        assert client.mail("f@example.com")[0] == 530
        client.login("user", "pw")
        assert client.mail("f@example.com")[0] == 250


def test_wait_for_gives_up_after_its_timeout():
    with SmtpSink() as sink:
        started = time.monotonic()
        assert sink.wait_for(1, timeout=0.1) is False
        assert time.monotonic() - started < 1


def test_describe_names_the_address_the_count_the_faults_and_the_settings():
    with WebhookSink() as sink:
        sink.slow_ms = 200
        text = sink.describe()

    assert text.startswith(f"webhook sink at http://127.0.0.1:{sink.port}: 0 received; faults: slow_ms=200\n")
    assert f'"url": "http://127.0.0.1:{sink.port}/deliveries"' in text


def test_smtp_describe():
    with SmtpSink() as sink:
        sink.hang_after_data = True
        assert sink.describe().startswith(
            f"SMTP sink at smtp://127.0.0.1:{sink.port}: 0 received; faults: hang_after_data=all"
        )


def test_a_refusing_http_sink_can_listen_again_on_the_same_port():
    with WebhookSink() as sink:
        port = sink.port
        sink.refuse()
        with pytest.raises(ConnectionRefusedError):
            post(port, "/deliveries")
        assert "refuse=True" in sink.describe()

        sink.start()
        assert sink.port == port
        assert post(port, "/deliveries", headers={"Idempotency-Key": "k"})[0] == 201


def test_stop_releases_a_hung_request_promptly():
    sink = VoiceSink().start()
    sink.hang = True

    def wait_for_an_answer() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):  # released without an answer
            post(sink.port, "/x")

    client = threading.Thread(target=wait_for_an_answer)
    client.start()
    time.sleep(0.1)

    started = time.monotonic()
    sink.stop()
    client.join(timeout=3)

    assert time.monotonic() - started < 1
    assert not client.is_alive()


def test_voice_sink_answers_unknown_paths_like_twilio():
    with VoiceSink() as sink:
        status, body = post(sink.port, "/2010-04-01/Accounts/ACother/Calls.json")

    assert status == 404
    assert b'"code": 20404' in body


def test_webhook_sink_requires_a_key_and_json():
    with WebhookSink() as sink:
        assert post(sink.port, "/d")[0] == 400
        assert post(sink.port, "/d", b"not json", {"Idempotency-Key": "k"})[0] == 400
        assert post(sink.port, "/d", b"{}", {"Idempotency-Key": "k"})[0] == 201
        assert post(sink.port, "/d", b"{}", {"Idempotency-Key": "k"})[0] == 200

        assert len(sink.deliveries) == 1
        assert sink.duplicate_attempts == 1


def test_status_500_is_short_for_force_status():
    sink = WebhookSink()
    sink.status_500 = True
    assert sink.force_status == 500
    sink.status_500 = False
    assert sink.force_status is None


def test_http_sinks_keep_connections_alive_and_count_them():
    with WebhookSink() as sink:
        connection = http.client.HTTPConnection("127.0.0.1", sink.port, timeout=2)
        for n in range(3):
            connection.request("POST", "/d", body=b"{}", headers={"Idempotency-Key": f"k{n}"})
            assert connection.getresponse().read()
        connection.close()
        assert post(sink.port, "/d", headers={"Idempotency-Key": "other"})[0] == 201

        assert sink.connections == 2


def test_refuse_ends_idle_kept_alive_connections_promptly():
    sink = WebhookSink().start()
    connection = http.client.HTTPConnection("127.0.0.1", sink.port, timeout=2)
    connection.request("POST", "/d", body=b"{}", headers={"Idempotency-Key": "k"})
    connection.getresponse().read()

    started = time.monotonic()
    sink.stop()

    assert time.monotonic() - started < 1
    assert connection.sock is not None and connection.sock.recv(1) == b""  # the server closed it
    connection.close()
