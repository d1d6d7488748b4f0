"""WebhookAdapter against WebhookSink, a receiver that processes each Idempotency-Key once."""

from __future__ import annotations

import uuid

import pytest

from kernel_driver.providers import OutboundItem, Outcome, ProviderConfigError, outbox_outcome
from kernel_driver.providers.webhook import WebhookAdapter
from kernel_driver.testing.sinks import WebhookSink, refused_port

SECRET_ENV = "HOOK_SECRET"


def email(key: str | None = None) -> OutboundItem:
    return OutboundItem(
        id=str(uuid.uuid4()),
        idempotency_key=key or f"root:email:{uuid.uuid4()}:1",
        channel="email",
        recipient="ann@example.com",
        content={"subject": "Hi", "text": "Hello"},
        run_id=str(uuid.uuid4()),
        contact_id=str(uuid.uuid4()),
    )


@pytest.fixture
def secret():
    return "whsec-" + uuid.uuid4().hex


@pytest.fixture
def sink(secret):
    with WebhookSink(secret=secret) as running:
        yield running


@pytest.fixture
def adapter(sink, secret):
    settings = {**sink.provider_settings(secret_env=SECRET_ENV), "timeout_s": 0.5}
    return WebhookAdapter(settings, {SECRET_ENV: secret})


def test_accepted_delivery_is_signed_and_carries_the_item(sink, adapter):
    item = email()

    result = adapter.send(item)

    assert result.outcome is Outcome.ACCEPTED, result.error
    delivery = sink.deliveries_by_key[item.idempotency_key]  # the sink checked the signature
    assert result.provider_message_id == delivery.id
    assert delivery.payload == {
        "idempotency_key": item.idempotency_key,
        "channel": "email",
        "recipient": "ann@example.com",
        "content": {"subject": "Hi", "text": "Hello"},
        "run_id": item.run_id,
        "contact_id": item.contact_id,
        "item_id": item.id,
    }


def test_a_2xx_without_an_id_uses_the_key(sink, adapter):
    sink.force_status = 202
    item = email()

    result = adapter.send(item)

    assert (result.outcome, result.provider_message_id) == (Outcome.ACCEPTED, item.idempotency_key)


def test_conflict_means_already_processed_and_is_accepted(sink, adapter):
    sink.force_status = 409

    assert adapter.send(email()).outcome is Outcome.ACCEPTED


def test_a_wrong_signature_is_rejected(sink):
    adapter = WebhookAdapter(sink.provider_settings(secret_env=SECRET_ENV), {SECRET_ENV: "not-the-secret"})

    result = adapter.send(email())

    assert result.outcome is Outcome.REJECTED
    assert result.error == "HTTP 401: bad signature"
    assert sink.deliveries == []


@pytest.mark.parametrize(
    ("status", "outcome"), [(422, Outcome.REJECTED), (408, Outcome.NOT_SENT), (429, Outcome.NOT_SENT)]
)
def test_client_errors(sink, adapter, status, outcome):
    sink.force_status = status

    assert adapter.send(email()).outcome is outcome


def test_refused_connection_is_not_sent():
    adapter = WebhookAdapter({"url": f"http://127.0.0.1:{refused_port()}/hook"})

    assert adapter.send(email()).outcome is Outcome.NOT_SENT


def test_server_error_is_ambiguous(sink, adapter):
    sink.status_500 = True

    assert adapter.send(email()).outcome is Outcome.AMBIGUOUS


def test_timeout_then_resend_with_the_same_key_delivers_once(sink, adapter):
    sink.timeout_first_n = 1
    item = email()

    lost = adapter.send(item)
    # the receiver deduplicates, so the daemon re-sends an ambiguous item with the same key
    assert outbox_outcome(lost.outcome, WebhookAdapter.deduplicates) == "retry"
    resent = adapter.send(item)

    assert lost.outcome is Outcome.AMBIGUOUS
    assert resent.outcome is Outcome.ACCEPTED
    assert list(sink.deliveries_by_key) == [item.idempotency_key]
    assert resent.provider_message_id == sink.deliveries_by_key[item.idempotency_key].id
    assert sink.duplicate_attempts == 1


def test_the_secret_never_shows(sink, adapter, secret):
    result = adapter.send(email())

    for shown in (repr(adapter), repr(result)):
        assert secret not in shown


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({}, "webhook setting 'url' is required"),
        ({"url": "ftp://example.com"}, "'url' must be an http:// or https:// URL, got 'ftp://example.com'"),
        ({"url": "https://example.com", "secret_env": "my secret"}, "'secret_env' must be the name of"),
        ({"url": "https://example.com", "timeout_s": "5"}, "'timeout_s' must be a number"),
    ],
)
def test_settings_problems_are_readable(settings, problem):
    assert any(problem in text for text in WebhookAdapter.validate_settings(settings))


def test_an_env_name_problem_does_not_echo_the_value():
    [problem] = WebhookAdapter.validate_settings({"url": "https://example.com", "secret_env": "s3cr3t value"})

    assert "s3cr3t" not in problem


def test_a_missing_secret_names_the_variable():
    with pytest.raises(ProviderConfigError, match="environment variable HOOK_SECRET"):
        WebhookAdapter({"url": "https://example.com", "secret_env": "HOOK_SECRET"}, {})
