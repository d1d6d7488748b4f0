"""SmtpAdapter against a real SMTP server (SmtpSink): every outcome, pooling, threads, secrets."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid

import pytest

from kernel_driver.providers import OutboundItem, Outcome, ProviderConfigError, outbox_outcome
from kernel_driver.providers.smtp import SmtpAdapter
from kernel_driver.testing.sinks import SmtpSink, refused_port

CONTENT = {"subject": "Spring sale", "text": "Hello.\n.A line starting with a dot.", "html": "<p>Hello.</p>"}


def email(recipient: str = "ann@example.com", key: str | None = None, **content: str) -> OutboundItem:
    return OutboundItem(
        id=str(uuid.uuid4()),
        idempotency_key=key or f"root:email:{uuid.uuid4()}:1",
        channel="email",
        recipient=recipient,
        content=content or CONTENT,
        run_id=str(uuid.uuid4()),
        contact_id=str(uuid.uuid4()),
    )


@pytest.fixture
def sink():
    with SmtpSink() as running:
        yield running


@pytest.fixture
def adapter(sink):
    with SmtpAdapter(dict(sink.provider_settings(), timeout_s=0.5)) as smtp:
        yield smtp


def test_accepted_message_carries_a_message_id_derived_from_the_key(sink, adapter):
    item = email(key="run-1:email:contact-1:1")
    result = adapter.send(item)

    assert result.outcome is Outcome.ACCEPTED, result.error
    assert sink.wait_for(1)
    [message] = sink.messages
    assert result.provider_message_id == message.message_id == adapter.message_id(item.idempotency_key)
    assert message.message_id.endswith("@example.com>")
    assert message.headers["X-Idempotency-Key"] == item.idempotency_key
    assert (message.mail_from, message.rcpt_tos) == ("campaigns@example.com", ("ann@example.com",))
    assert message.subject == "Spring sale"
    assert message.text == CONTENT["text"] + "\n"  # dot-stuffing undone by the server
    assert message.html is not None and "<p>Hello.</p>" in message.html
    assert result.response["smtp_code"] == 250


def test_message_id_is_the_same_for_the_same_key_in_another_adapter(sink):
    settings = sink.provider_settings()
    with SmtpAdapter(settings) as first, SmtpAdapter(settings) as second:
        assert first.message_id("k:1") == second.message_id("k:1")
        assert first.message_id("k:1") != first.message_id("k:2")


def test_sends_reuse_one_session_and_survive_the_server_closing_it():
    with SmtpSink(idle_timeout_s=0.2) as sink, SmtpAdapter(sink.provider_settings()) as adapter:
        for _ in range(3):
            assert adapter.send(email()).outcome is Outcome.ACCEPTED
        time.sleep(0.4)  # the server drops the idle session
        assert adapter.send(email()).outcome is Outcome.ACCEPTED

    peers = [message.peer for message in sink.messages]
    assert len(set(peers[:3])) == 1
    assert peers[3] != peers[0]


def test_permanent_refusal_of_a_recipient_is_rejected_and_the_session_goes_on(sink, adapter):
    sink.reject_rcpt = {"gone@example.com"}

    rejected = adapter.send(email("gone@example.com"))
    accepted = adapter.send(email("ann@example.com"))

    assert rejected.outcome is Outcome.REJECTED
    assert rejected.response["smtp_code"] == 550
    assert "550" in (rejected.error or "")
    assert accepted.outcome is Outcome.ACCEPTED
    assert sink.count_by_recipient() == {"ann@example.com": 1}


def test_temporary_refusal_is_not_sent(sink, adapter):
    sink.temp_fail = True

    result = adapter.send(email())

    assert result.outcome is Outcome.NOT_SENT
    assert (result.response["smtp_phase"], result.response["smtp_code"]) == ("RCPT", 451)
    assert sink.messages == []


def test_refused_connection_is_not_sent():
    adapter = SmtpAdapter(
        {"host": "127.0.0.1", "port": refused_port(), "from": "a@example.com", "timeout_s": 0.5}
    )

    result = adapter.send(email())

    assert result.outcome is Outcome.NOT_SENT
    assert "ConnectionRefusedError" in (result.error or "")


def test_lost_answer_after_data_is_ambiguous_and_the_next_send_reconnects(sink, adapter):
    sink.hang_after_data = {"slow@example.com"}

    lost = adapter.send(email("slow@example.com"))
    after = adapter.send(email("ann@example.com"))

    assert lost.outcome is Outcome.AMBIGUOUS
    assert lost.response == {"smtp_phase": "end of data"}
    assert after.outcome is Outcome.ACCEPTED
    assert sink.count_by_recipient() == {"slow@example.com": 1, "ann@example.com": 1}  # it did arrive


@pytest.mark.parametrize(
    "item",
    [
        email(subject="", text="body"),
        email(subject="no text"),
        email("ann@example.com\r\nBcc: all@example.com"),
        email("nobody"),
        email("ann@" + "ü" * 70 + ".example"),
        email(key="root:email:ä:1"),
    ],
    ids=["empty subject", "missing text", "header injection", "no address", "no IDNA form", "non-ascii key"],
)
def test_an_unsendable_item_is_rejected_without_a_connection(item):
    adapter = SmtpAdapter({"host": "127.0.0.1", "port": refused_port(), "from": "a@example.com"})

    result = adapter.send(item)

    assert result.outcome is Outcome.REJECTED
    assert result.error and result.error.startswith("cannot build the message")


def test_eight_threads_through_one_adapter_deliver_each_message_once(sink, adapter):
    items = [email(f"user{n}@example.com") for n in range(40)]
    results = {}

    def send_share(share: list[OutboundItem]) -> None:
        for item in share:
            results[item.idempotency_key] = adapter.send(item)

    threads = [threading.Thread(target=send_share, args=(items[n::8],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert {result.outcome for result in results.values()} == {Outcome.ACCEPTED}
    assert sink.wait_for(40)
    assert sink.count_by_recipient() == {item.recipient: 1 for item in items}
    assert {m.message_id for m in sink.messages} == {adapter.message_id(i.idempotency_key) for i in items}


@pytest.fixture
def certificate(tmp_path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (cert file, key file)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("tls", ["starttls", "ssl"])
def test_tls_sessions_verify_the_server_certificate(certificate, tls):
    with SmtpSink(tls=tls, certificate=certificate) as sink:
        trusting = SmtpAdapter(sink.provider_settings())
        default_trust = SmtpAdapter({**sink.provider_settings(), "ca_file": None})
        with trusting, default_trust:
            accepted, untrusted = trusting.send(email()), default_trust.send(email())

    assert accepted.outcome is Outcome.ACCEPTED, accepted.error
    assert untrusted.outcome is Outcome.NOT_SENT
    assert "CERTIFICATE_VERIFY_FAILED" in (untrusted.error or "")
    assert sink.count_by_recipient() == {"ann@example.com": 1}


def test_an_unreadable_ca_file_is_a_config_error(tmp_path):
    settings = {
        "host": "h",
        "port": 587,
        "from": "a@example.com",
        "starttls": True,
        "ca_file": str(tmp_path / "no"),
    }

    with pytest.raises(
        ProviderConfigError, match=r"smtp setting 'ca_file' .* cannot be used: FileNotFoundError"
    ):
        SmtpAdapter(settings)


def test_login_uses_the_secret_from_the_environment_and_never_shows_it():
    password = "pw-" + uuid.uuid4().hex
    with SmtpSink(credentials=("mailer", password)) as sink:
        settings = sink.provider_settings(username_env="MAIL_USER", password_env="MAIL_PASSWORD")
        good = SmtpAdapter(settings, {"MAIL_USER": "mailer", "MAIL_PASSWORD": password})
        bad = SmtpAdapter(settings, {"MAIL_USER": "mailer", "MAIL_PASSWORD": password + "x"})
        with good, bad:
            accepted, refused = good.send(email()), bad.send(email())

    assert accepted.outcome is Outcome.ACCEPTED
    assert refused.outcome is Outcome.REJECTED  # 535: retrying cannot help
    assert refused.response["smtp_code"] == 535
    for shown in (repr(good), repr(bad), repr(accepted), repr(refused)):
        assert password not in shown


def test_a_missing_secret_names_the_variable():
    settings = {
        "host": "h",
        "port": 25,
        "from": "a@example.com",
        "username_env": "U",
        "password_env": "SMTP_PW",
    }

    with pytest.raises(ProviderConfigError, match=r"environment variable SMTP_PW .*'password_env'"):
        SmtpAdapter(settings, {"U": "user"})


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"port": 25, "from": "a@example.com"}, "smtp setting 'host' is required"),
        (
            {"host": "h", "port": 70000, "from": "a@example.com"},
            "'port' must be an integer from 1 to 65535, got 70000",
        ),
        ({"host": "h", "port": "25", "from": "a@example.com"}, "'port' must be an integer"),
        ({"host": "h", "port": 25, "from": "nobody"}, "'from' must be an e-mail address"),
        (
            {"host": "h", "port": 25, "from": "a@example.com", "timeout_s": 0},
            "'timeout_s' must be a number greater than 0",
        ),
        (
            {"host": "h", "port": 465, "from": "a@example.com", "ssl": True, "starttls": True},
            "cannot both be true",
        ),
        ({"host": "h", "port": 25, "from": "a@example.com", "username_env": "U"}, "go together"),
        (
            {"host": "h", "port": 25, "from": "a@example.com", "password_env": "not a name"},
            "environment variable",
        ),
    ],
)
def test_settings_problems_are_readable(settings, problem):
    problems = SmtpAdapter.validate_settings(settings)

    assert any(problem in text for text in problems), problems
    with pytest.raises(ProviderConfigError, match="invalid smtp settings"):
        SmtpAdapter(settings, {})


def test_valid_settings_have_no_problems_and_a_display_name_is_allowed():
    assert SmtpAdapter.validate_settings({"host": "h", "port": 587, "from": "Shop <news@shop.example>"}) == []


# ------------------------------------------------------------ what the adapter announces

GREETING = {"subject": "Grüße aus Köln", "text": "Schöne Grüße — bis bald.\n", "html": "<p>Schöne Grüße</p>"}


def test_8bit_content_is_announced_with_body_8bitmime(sink, adapter):
    result = adapter.send(email(**GREETING))
    plain = adapter.send(email())

    assert result.outcome is Outcome.ACCEPTED, result.error
    assert plain.outcome is Outcome.ACCEPTED
    eight_bit, seven_bit = sink.messages
    assert "BODY=8BITMIME" in eight_bit.mail_options
    assert b"Content-Transfer-Encoding: 8bit" in eight_bit.raw
    assert (eight_bit.subject, eight_bit.text) == (GREETING["subject"], GREETING["text"])
    assert seven_bit.mail_options == ()  # 7-bit content needs no announcement


def test_a_server_without_8bitmime_gets_the_message_7bit_clean():
    with SmtpSink(eight_bit_mime=False) as sink, SmtpAdapter(sink.provider_settings()) as adapter:
        result = adapter.send(email(**GREETING))

    assert result.outcome is Outcome.ACCEPTED, result.error  # the sink refuses 8-bit data
    [message] = sink.messages
    assert message.raw.isascii() and message.mail_options == ()
    assert message.subject == GREETING["subject"]
    assert message.text is not None and message.text.replace("\r\n", "\n") == GREETING["text"]  # base64 keeps CRLF
    assert message.html is not None and "Schöne Grüße" in message.html


def test_a_non_ascii_address_goes_with_smtputf8_when_offered():
    with SmtpSink(smtputf8=True) as sink, SmtpAdapter(sink.provider_settings()) as adapter:
        result = adapter.send(email("ännchen@example.com", **GREETING))

    assert result.outcome is Outcome.ACCEPTED, result.error
    [message] = sink.messages
    assert message.rcpt_tos == ("ännchen@example.com",)
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(message.mail_options)
    assert message.headers["To"] == "ännchen@example.com"
    assert message.text == GREETING["text"]


def test_a_non_ascii_address_is_rejected_clearly_when_smtputf8_is_not_offered(sink, adapter):
    refused = adapter.send(email("ännchen@example.com"))
    after = adapter.send(email())

    assert refused.outcome is Outcome.REJECTED
    assert "does not offer SMTPUTF8" in (refused.error or "")
    assert after.outcome is Outcome.ACCEPTED
    assert [m.rcpt_tos for m in sink.messages] == [("ann@example.com",)]


def test_a_non_ascii_domain_is_sent_in_idna(sink, adapter):
    result = adapter.send(email("ann@bücher.example", **GREETING))

    assert result.outcome is Outcome.ACCEPTED, result.error
    [message] = sink.messages
    assert message.rcpt_tos == ("ann@xn--bcher-kva.example",)
    assert "SMTPUTF8" not in message.mail_options


def test_the_idempotency_header_stays_on_one_raw_line(sink, adapter):
    key = f"{uuid.uuid4()}:email:{uuid.uuid4()}:1"
    assert len(key) == 81

    assert adapter.send(email(key=key)).outcome is Outcome.ACCEPTED

    [message] = sink.messages
    assert f"X-Idempotency-Key: {key}\r\n".encode() in message.raw
    assert message.headers["X-Idempotency-Key"] == key


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_non_ascii_credentials_work_over_auth(mechanism):
    user, password = "mäiler", "pässwört-" + uuid.uuid4().hex
    with SmtpSink(credentials=(user, password), auth_mechanisms=[mechanism]) as sink:
        settings = sink.provider_settings(username_env="MAIL_USER", password_env="MAIL_PASSWORD")
        good = SmtpAdapter(settings, {"MAIL_USER": user, "MAIL_PASSWORD": password})
        bad = SmtpAdapter(settings, {"MAIL_USER": user, "MAIL_PASSWORD": password + "ß"})
        with good, bad:
            accepted, refused = good.send(email()), bad.send(email())

    assert accepted.outcome is Outcome.ACCEPTED, accepted.error
    assert refused.outcome is Outcome.REJECTED and refused.response["smtp_code"] == 535
    assert sink.count_by_recipient() == {"ann@example.com": 1}


def test_auth_the_server_does_not_offer_is_a_configuration_error_not_unknown(sink):
    settings = sink.provider_settings(username_env="MAIL_USER", password_env="MAIL_PASSWORD")
    settings.update(username_env="MAIL_USER", password_env="MAIL_PASSWORD")
    with SmtpAdapter(settings, {"MAIL_USER": "u", "MAIL_PASSWORD": "p"}) as adapter:
        result = adapter.send(email())

    assert result.outcome is Outcome.REJECTED
    assert "AUTH extension not supported" in (result.error or "")
    assert outbox_outcome(result.outcome, SmtpAdapter.deduplicates) == "failed"


def test_starttls_the_server_does_not_offer_is_a_configuration_error(sink):
    with SmtpAdapter({**sink.provider_settings(), "starttls": True}) as adapter:
        result = adapter.send(email())

    assert result.outcome is Outcome.REJECTED
    assert "STARTTLS extension not supported" in (result.error or "")
    assert sink.messages == []


def test_tls_to_a_plain_server_is_not_sent(sink):
    with SmtpAdapter({**sink.provider_settings(), "ssl": True}) as adapter:
        result = adapter.send(email())

    assert result.outcome is Outcome.NOT_SENT
    assert "SSL" in (result.error or "")
