"""TwilioAdapter against VoiceSink, a local server that behaves like the Twilio Calls API."""

from __future__ import annotations

import uuid

import pytest

from kernel_driver.providers import OutboundItem, Outcome, ProviderConfigError
from kernel_driver.providers.twilio import TwilioAdapter
from kernel_driver.testing.sinks import VoiceSink, refused_port

TOKEN_ENV = "VOICE_TOKEN"


def call(recipient: str = "+15551230001", **content: str) -> OutboundItem:
    return OutboundItem(
        id=str(uuid.uuid4()),
        idempotency_key=f"root:voice:{uuid.uuid4()}:1",
        channel="voice",
        recipient=recipient,
        content=content or {"script": "Your order has shipped."},
        run_id=str(uuid.uuid4()),
        contact_id=str(uuid.uuid4()),
    )


@pytest.fixture
def sink():
    with VoiceSink() as running:
        yield running


def adapter_for(sink: VoiceSink, token: str | None = None, **settings: object) -> TwilioAdapter:
    merged = {**sink.provider_settings(auth_token_env=TOKEN_ENV), "timeout_s": 0.5, **settings}
    return TwilioAdapter(merged, {TOKEN_ENV: token or sink.auth_token})


def test_accepted_call_stores_the_call_sid_and_sends_the_key(sink):
    item = call(script="Hello <Ann> & friends", **{"from": "+15559990000"})

    result = adapter_for(sink).send(item)

    assert result.outcome is Outcome.ACCEPTED, result.error
    [recorded] = sink.calls
    assert result.provider_message_id == recorded.sid
    assert recorded.sid.startswith("CA") and len(recorded.sid) == 34
    assert result.response["body"]["status"] == "queued"
    assert recorded.to == "+15551230001"
    assert recorded.from_ == "+15559990000"  # the item's caller id beats the setting
    assert recorded.twiml == "<Response><Say>Hello &lt;Ann&gt; &amp; friends</Say></Response>"
    assert recorded.idempotency_token == item.idempotency_key


def test_caller_id_comes_from_the_settings_when_the_item_has_none(sink):
    adapter_for(sink).send(call())

    assert sink.calls[0].from_ == sink.provider_settings()["from"]


def test_invalid_number_is_rejected(sink):
    result = adapter_for(sink).send(call("555"))

    assert result.outcome is Outcome.REJECTED
    assert result.response["http_status"] == 400
    assert result.response["body"]["code"] == 21211
    assert result.error == "HTTP 400: Invalid 'To' Phone Number: 555"


def test_wrong_token_is_rejected_and_never_shown(sink):
    wrong_token = "wrong-" + uuid.uuid4().hex
    adapter = adapter_for(sink, token=wrong_token)

    result = adapter.send(call())

    assert result.outcome is Outcome.REJECTED
    assert result.response["http_status"] == 401
    for shown in (repr(adapter), repr(result)):
        assert wrong_token not in shown and sink.auth_token not in shown


def test_too_many_requests_is_not_sent(sink):
    sink.force_status = 429

    assert adapter_for(sink).send(call()).outcome is Outcome.NOT_SENT


def test_refused_connection_is_not_sent():
    adapter = TwilioAdapter(
        {
            "base_url": f"http://127.0.0.1:{refused_port()}",
            "account_sid": "AC1",
            "auth_token_env": "T",
            "from": "+15550001111",
        },
        {"T": "token"},
    )

    result = adapter.send(call())

    assert result.outcome is Outcome.NOT_SENT
    assert "ConnectionRefusedError" in (result.error or "")


def test_server_error_is_ambiguous(sink):
    sink.status_500 = True

    result = adapter_for(sink).send(call())

    assert result.outcome is Outcome.AMBIGUOUS
    assert result.error and result.error.startswith("HTTP 500")


def test_no_answer_is_ambiguous_though_the_call_was_placed(sink):
    sink.hang = True

    result = adapter_for(sink, timeout_s=0.3).send(call())

    assert result.outcome is Outcome.AMBIGUOUS
    assert "sent but no reply" in (result.error or "")
    assert len(sink.calls) == 1


def test_a_late_answer_within_the_timeout_is_accepted(sink):
    sink.slow_ms = 100

    assert adapter_for(sink, timeout_s=1).send(call()).outcome is Outcome.ACCEPTED


def test_an_item_without_a_script_is_rejected_before_calling(sink):
    result = adapter_for(sink).send(call(**{"from": "+15559990000"}))

    assert result.outcome is Outcome.REJECTED
    assert result.error == "voice item lacks content 'script'"
    assert sink.calls == []


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"auth_token_env": "T"}, "twilio setting 'account_sid' is required"),
        ({"account_sid": "AC1"}, "twilio setting 'auth_token_env' is required"),
        (
            {"account_sid": "AC1", "auth_token_env": "T", "base_url": "api.twilio.com"},
            "'base_url' must be an http",
        ),
        (
            {"account_sid": "AC1", "auth_token_env": "T", "timeout_s": -1},
            "'timeout_s' must be a number greater",
        ),
    ],
)
def test_settings_problems_are_readable(settings, problem):
    assert any(problem in text for text in TwilioAdapter.validate_settings(settings))


def test_a_missing_token_names_the_variable():
    with pytest.raises(ProviderConfigError, match="environment variable TWILIO_TOKEN"):
        TwilioAdapter({"account_sid": "AC1", "auth_token_env": "TWILIO_TOKEN"}, {})
