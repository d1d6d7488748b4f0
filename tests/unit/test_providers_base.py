"""The adapter contract: discovery by entry point, outcome mapping, the send() guarantees, noop."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from kernel_driver.providers import (
    OutboundItem,
    Outcome,
    ProviderAdapter,
    ProviderConfigError,
    SendResult,
    installed_providers,
    load_adapter,
    outbox_outcome,
)
from kernel_driver.providers.noop import NoopAdapter
from kernel_driver.providers.smtp import SmtpAdapter
from kernel_driver.providers.twilio import TwilioAdapter
from kernel_driver.providers.webhook import WebhookAdapter


def item(channel: str = "email", key: str = "root:email:contact:1") -> OutboundItem:
    return OutboundItem(
        str(uuid.uuid4()), key, channel, "ann@example.com", {"subject": "s", "text": "t"}, "r", "c"
    )


@pytest.mark.parametrize(
    ("name", "adapter", "channels", "deduplicates"),
    [
        ("smtp", SmtpAdapter, {"email"}, False),
        ("twilio", TwilioAdapter, {"voice"}, False),
        ("webhook", WebhookAdapter, {"email", "voice"}, True),
        ("noop", NoopAdapter, {"email", "voice"}, True),
    ],
)
def test_shipped_adapters_are_found_by_entry_point(name, adapter, channels, deduplicates):
    found = load_adapter(name)

    assert found is adapter
    assert (found.name, found.channels, found.deduplicates) == (name, channels, deduplicates)


def test_an_unknown_adapter_is_refused_with_the_installed_names():
    assert {"smtp", "twilio", "webhook", "noop"} <= set(installed_providers())

    with pytest.raises(
        ProviderConfigError, match=r"unknown provider 'sendgrid'; installed providers: .*noop.*smtp"
    ):
        load_adapter("sendgrid")


@pytest.mark.parametrize(
    ("outcome", "deduplicates", "recorded"),
    [
        (Outcome.ACCEPTED, False, "sent"),
        (Outcome.REJECTED, True, "failed"),
        (Outcome.NOT_SENT, False, "retry"),
        (Outcome.AMBIGUOUS, True, "retry"),
        (Outcome.AMBIGUOUS, False, "unknown"),
    ],
)
def test_outbox_outcome_never_resends_an_ambiguous_item_without_deduplication(
    outcome, deduplicates, recorded
):
    assert outbox_outcome(outcome, deduplicates) == recorded


def test_settings_must_be_an_object():
    assert NoopAdapter.validate_settings(["latency_ms"]) == ["noop settings must be a JSON object, got list"]  # type: ignore[arg-type]
    assert SmtpAdapter.validate_settings("smtp.example.com")  # type: ignore[arg-type]


def test_invalid_settings_raise_with_every_problem():
    with pytest.raises(ProviderConfigError) as raised:
        SmtpAdapter({"port": 0}, {})

    message = str(raised.value)
    assert message.startswith("invalid smtp settings: ")
    for problem in (
        "'host' is required",
        "'port' must be an integer from 1 to 65535, got 0",
        "'from' is required",
    ):
        assert problem in message


def test_unknown_keys_are_left_for_the_kernel():
    assert NoopAdapter.validate_settings({"max_per_second": 50}) == []


def test_an_item_for_another_channel_is_rejected():
    result = TwilioAdapter({"account_sid": "AC1", "auth_token_env": "T"}, {"T": "x"}).send(item("email"))

    assert result.outcome is Outcome.REJECTED
    assert result.error == "provider twilio does not serve channel 'email' (it serves voice)"


class ExplodingAdapter(ProviderAdapter):
    name = "exploding"
    channels = frozenset({"email"})

    def deliver(self, item: OutboundItem) -> SendResult:
        raise KeyError("a bug")


def test_an_adapter_bug_is_ambiguous_rather_than_raised():
    result = ExplodingAdapter({}).send(item())

    assert result.outcome is Outcome.AMBIGUOUS
    assert result.error == "adapter error: KeyError: 'a bug'"


def test_noop_accepts_with_an_id_derived_from_the_key():
    noop = NoopAdapter({})

    first, again, other = noop.send(item()), noop.send(item()), noop.send(item(key="another"))

    assert first.outcome is Outcome.ACCEPTED
    assert first.provider_message_id == again.provider_message_id != other.provider_message_id
    assert first.provider_message_id is not None and first.provider_message_id.startswith("noop-")
    assert first.response == {"noop": True}


def test_noop_latency():
    started = time.monotonic()
    NoopAdapter({"latency_ms": 50}).send(item("voice"))

    assert time.monotonic() - started >= 0.05
    assert NoopAdapter.validate_settings({"latency_ms": -1}) == [
        "noop setting 'latency_ms' must be a number, 0 or more, got -1"
    ]


def test_repr_shows_settings_with_defaults():
    settings: dict[str, Any] = {"url": "https://hooks.example.com/in", "secret_env": "HOOK_SECRET"}

    shown = repr(WebhookAdapter(settings, {"HOOK_SECRET": "value-never-shown"}))

    assert shown == f"WebhookAdapter({dict(settings, timeout_s=10)!r})"


def test_an_adapter_without_send_later_leaves_the_call_to_send():
    assert ExplodingAdapter({}).send_later(item(), lambda result: pytest.fail("no callback expected")) is False


def test_noop_answers_send_later_at_once_unless_it_sleeps():
    results: list[SendResult] = []

    assert NoopAdapter({}).send_later(item(), results.append) is True
    assert [r.outcome for r in results] == [Outcome.ACCEPTED]  # in the caller's thread, before returning
    assert results[0].provider_message_id == NoopAdapter({}).send(item()).provider_message_id

    assert NoopAdapter({"latency_ms": 5}).send_later(item(), results.append) is False  # threads wait for it
    assert len(results) == 1
