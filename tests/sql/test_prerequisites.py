"""check_campaign_launch_prerequisites: each check fails for its own reason, and deploy_campaign
refuses (KE001, naming every failed check) without writing anything."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.sql.helpers import (
    LAUNCH_CHECKS,
    SETTINGS,
    deploy,
    raises,
    refused,
    rows,
    scalar,
    seed_campaign,
)


def checks(conn, campaign_id, workspace_id):
    return rows(
        conn,
        "SELECT * FROM check_campaign_launch_prerequisites(%s, %s)",
        [campaign_id, workspace_id],
    )


def failed(found):
    return {c["check_name"]: c["detail"] for c in found if not c["passed"]}


def settings(provider, **changes):
    merged = {**SETTINGS[provider], **changes}
    return {k: v for k, v in merged.items() if v is not None}


def test_a_good_campaign_passes_every_check_in_order(conn):
    seed = seed_campaign(conn, 3)
    found = checks(conn, seed.campaign_id, seed.workspace_id)
    assert [c["check_name"] for c in found] == LAUNCH_CHECKS
    assert all(c["passed"] for c in found)
    assert all(c["detail"] for c in found)


@pytest.mark.parametrize("channel", ["email", "voice"])
def test_both_channels_with_their_default_providers_pass(conn, channel):
    seed = seed_campaign(conn, 2, channel=channel)
    assert failed(checks(conn, seed.campaign_id, seed.workspace_id)) == {}


@pytest.mark.parametrize("which", ["missing", "wrong-workspace"])
def test_campaign_exists_fails_alone(conn, which):
    seed = seed_campaign(conn, 2)
    campaign = uuid.uuid4() if which == "missing" else seed.campaign_id
    workspace = seed.workspace_id if which == "missing" else uuid.uuid4()
    found = checks(conn, campaign, workspace)
    assert [(c["check_name"], c["passed"]) for c in found] == [("campaign_exists", False)]
    assert str(campaign) in found[0]["detail"]


# (seed options, extra setup SQL on the seed, {failed check: words its detail must contain})
SCENARIOS = {
    "unsupported-channel": (
        {"channel": "sms", "content": {"text": "hi"}, "provider": "webhook"},
        None,
        {"channel_supported": "sms", "content_complete": "no content rules"},
    ),
    "email-without-subject": (
        {"content": {"text": "body only"}},
        None,
        {"content_complete": "subject"},
    ),
    "email-with-blank-text": (
        {"content": {"subject": "s", "text": "   "}},
        None,
        {"content_complete": "text"},
    ),
    "voice-without-script": (
        {"channel": "voice", "content": {"from": "+15550000000"}},
        None,
        {"content_complete": "script"},
    ),
    "voice-with-numeric-from": (
        {"channel": "voice", "content": {"from": 15550000000, "script": "hi"}},
        None,
        {"content_complete": "from"},
    ),
    "empty-audience": (
        {"contacts": 0},
        None,
        {"audience_not_empty": "0 contacts", "reachable_contacts": "0 of 0"},
    ),
    "all-unsubscribed": (
        {"contacts": 3, "unsubscribed_every": 1},
        None,
        {"reachable_contacts": "0 of 3"},
    ),
    "no-email-address": (
        {"contacts": 2, "no_address_every": 1},
        None,
        {"reachable_contacts": "0 of 2"},
    ),
    "voice-without-phone": (
        {"channel": "voice", "contacts": 2},
        "UPDATE contacts SET phone = ' ' WHERE tenant_id = %(tenant)s",
        {"reachable_contacts": "0 of 2"},
    ),
    "no-provider": (
        {"provider": None},
        None,
        {"provider_configured": "no provider_configs row", "provider_settings_valid": "no provider"},
    ),
    "smtp-port-abc": (
        {"settings": settings("smtp", port="abc")},
        None,
        {"provider_settings_valid": "port"},
    ),
    "smtp-port-out-of-range": (
        {"settings": settings("smtp", port=70000)},
        None,
        {"provider_settings_valid": "port"},
    ),
    "smtp-missing-host": (
        {"settings": settings("smtp", host=None)},
        None,
        {"provider_settings_valid": "host"},
    ),
    "smtp-ssl-and-starttls": (
        {"settings": settings("smtp", ssl=True, starttls=True)},
        None,
        {"provider_settings_valid": "not both"},
    ),
    "smtp-from-not-an-address": (
        {"settings": settings("smtp", **{"from": "newsletter"})},
        None,
        {"provider_settings_valid": "from"},
    ),
    "smtp-for-voice": (
        {"channel": "voice", "provider": "smtp"},
        None,
        {"provider_settings_valid": "cannot serve channel voice"},
    ),
    "twilio-bad-base-url": (
        {"channel": "voice", "settings": settings("twilio", base_url="api.twilio.com")},
        None,
        {"provider_settings_valid": "base_url"},
    ),
    "twilio-missing-account-sid": (
        {"channel": "voice", "settings": settings("twilio", account_sid=None)},
        None,
        {"provider_settings_valid": "account_sid"},
    ),
    "webhook-bad-url": (
        {"provider": "webhook", "settings": {"url": "ftp://hooks.example.com"}},
        None,
        {"provider_settings_valid": "url"},
    ),
    "webhook-missing-url": (
        {"provider": "webhook", "settings": {}},
        None,
        {"provider_settings_valid": "url"},
    ),
    "webhook-zero-timeout": (
        {"provider": "webhook", "settings": {"url": "https://h.example", "timeout_s": 0}},
        None,
        {"provider_settings_valid": "timeout_s"},
    ),
    "settings-not-an-object": (
        {"settings": ["host"]},
        None,
        {"provider_settings_valid": "JSON object"},
    ),
}


def scenario_seed(conn, name):
    options, setup, expected = SCENARIOS[name]
    options = dict(options)
    seed = seed_campaign(conn, options.pop("contacts", 3), **options)
    if setup:
        conn.execute(setup, {"tenant": seed.tenant_id, "workspace": seed.workspace_id})
    return seed, expected


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_check_fails_for_the_right_reason_and_deploy_refuses(conn, name):
    seed, expected = scenario_seed(conn, name)
    found = checks(conn, seed.campaign_id, seed.workspace_id)
    assert [c["check_name"] for c in found] == LAUNCH_CHECKS
    problems = failed(found)
    assert set(problems) == set(expected), problems
    for check, words in expected.items():
        assert words in problems[check], (check, problems[check])
    # deploy_campaign names each failed check, and writes nothing: no run, no job
    with refused(conn, "KE001", seed.campaign_id, *expected):
        deploy(conn, seed.campaign_id)
    assert scalar(conn, "SELECT count(*) FROM campaign_runs") == 0
    assert scalar(conn, "SELECT count(*) FROM job_queue") == 0


def test_no_active_run_fails_while_a_run_is_queued(conn):
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    problems = failed(checks(conn, seed.campaign_id, seed.workspace_id))
    assert set(problems) == {"no_active_run"}
    assert str(run_id) in problems["no_active_run"]


def test_several_failures_are_all_named(conn):
    seed = seed_campaign(conn, 2, content={}, provider=None, unsubscribed_every=1)
    with raises("KE001") as info:
        deploy(conn, seed.campaign_id)
    message = info.value.diag.message_primary
    for check in ["content_complete", "reachable_contacts", "provider_configured", "provider_settings_valid"]:
        assert check in message
    for check in ["campaign_exists", "channel_supported", "audience_not_empty", "no_active_run"]:
        assert check not in message


def test_provider_settings_problems_is_empty_for_the_defaults(conn):
    for provider, channel in [("smtp", "email"), ("twilio", "voice"), ("webhook", "email")]:
        problems = scalar(
            conn, "SELECT provider_settings_problems(%s, %s, %s)",
            [provider, channel, json.dumps(SETTINGS[provider])],
        )
        assert problems == [], (provider, problems)
