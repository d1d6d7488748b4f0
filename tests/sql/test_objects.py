"""The kernel's objects keep the seed's names: tables, frozen columns, constraints."""

from __future__ import annotations

import re
import uuid

import pytest

from tests.sql.helpers import deploy, jobs_of, raises, scalar, seed_campaign, triggers_off

FROZEN_COLUMNS = {
    "campaign_runs": [
        "id", "campaign_id", "tenant_id", "workspace_id", "status", "channel", "run_config",
        "started_at", "completed_at", "error_message",
    ],
    "job_queue": [
        "id", "run_id", "tenant_id", "workspace_id", "job_type", "status", "attempts",
        "locked_at", "locked_by", "last_error",
    ],
    "channel_outbox": [
        "id", "run_id", "job_id", "tenant_id", "workspace_id", "channel", "provider", "status",
        "idempotency_key", "provider_message_id", "provider_response", "skipped", "skip_reason",
        "error",
    ],
}

HOST_COLUMNS = {
    "campaigns": ["id", "tenant_id", "workspace_id", "name", "channel", "content"],
    "contacts": ["id", "tenant_id", "workspace_id", "email", "phone", "unsubscribed"],
    "campaign_audience": ["campaign_id", "contact_id"],
    "provider_configs": ["workspace_id", "channel", "provider", "settings"],
}

OTHER_TABLES = ["job_events", "schema_migrations", "rate_buckets"]

SEED_CONSTRAINTS = {  # name → pg_constraint.contype
    "channel_outbox_idempotency_key": "u",
    "channel_outbox_status_check": "c",
    "channel_outbox_skipped_status_check": "c",
}


def columns(conn, schema, table):
    return {
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s",
            [schema, table],
        )
    }


@pytest.mark.parametrize("tables", [FROZEN_COLUMNS, HOST_COLUMNS], ids=["frozen", "host"])
def test_tables_have_their_seed_columns(conn, kernel_schema, tables):
    missing = {
        table: sorted(set(expected) - columns(conn, kernel_schema, table))
        for table, expected in tables.items()
    }
    assert {t: m for t, m in missing.items() if m} == {}


def test_other_kernel_tables_exist(conn, kernel_schema):
    missing = [
        t for t in OTHER_TABLES
        if not scalar(conn, "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text))", [kernel_schema, t])
    ]
    assert missing == []


def test_content_and_settings_are_jsonb(conn, kernel_schema):
    types = dict(
        conn.execute(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = %s AND column_name IN ('content', 'settings', 'run_config',"
            " 'provider_response')",
            [kernel_schema],
        ).fetchall()
    )
    assert types == {
        "campaigns.content": "jsonb",
        "provider_configs.settings": "jsonb",
        "campaign_runs.run_config": "jsonb",
        "channel_outbox.provider_response": "jsonb",
    }


def test_outbox_constraints_have_their_seed_names(conn, kernel_schema):
    found = dict(
        conn.execute(
            "SELECT conname::text, contype::text FROM pg_constraint WHERE conrelid = %s::regclass",
            [f"{kernel_schema}.channel_outbox"],
        ).fetchall()
    )
    assert {n: found.get(n) for n in SEED_CONSTRAINTS} == SEED_CONSTRAINTS


def test_idempotency_key_constraint_is_unique_on_the_key_within_its_tenant(conn, kernel_schema):
    """Since 1.5 with tenant_id (a distributed table's unique keys must include it): the key
    begins with the lineage's root run, which belongs to one tenant, so no two rows share a key."""
    cols = scalar(
        conn,
        "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_constraint c"
        " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
        " WHERE c.conname = 'channel_outbox_idempotency_key' AND c.conrelid = %s::regclass",
        [f"{kernel_schema}.channel_outbox"],
    )
    assert cols == ["idempotency_key", "tenant_id"]


@pytest.fixture
def outbox_parent(conn):
    """A deployed run and its job, to hang hand-made outbox rows on."""
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    return {"run": run_id, "job": jobs_of(conn, run_id)[0]["id"], "contacts": seed.contact_ids, "seed": seed}


def insert_item(conn, parent, key=None, contact=0, **columns):
    values = {
        "run_id": parent["run"],
        "job_id": parent["job"],
        "tenant_id": parent["seed"].tenant_id,
        "workspace_id": parent["seed"].workspace_id,
        "channel": "email",
        "provider": "smtp",
        "idempotency_key": key or f"key-{uuid.uuid4()}",
        "contact_id": parent["contacts"][contact],
        "root_run_id": parent["run"],
        "generation": 1,
        **columns,
    }
    names = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    return scalar(conn, f"INSERT INTO channel_outbox ({names}) VALUES ({marks}) RETURNING id", list(values.values()))


def test_idempotency_key_refuses_a_second_row_with_the_same_key(conn, outbox_parent):
    insert_item(conn, outbox_parent, key="same-key", contact=0)
    with raises("23505") as info:
        insert_item(conn, outbox_parent, key="same-key", contact=1)
    assert info.value.diag.constraint_name == "channel_outbox_idempotency_key"


def test_an_item_belongs_to_a_job_of_its_own_run(conn, outbox_parent):
    other = seed_campaign(conn, 1)
    other_run = deploy(conn, other.campaign_id)
    with raises("23503") as info:
        insert_item(conn, outbox_parent, run_id=other_run)
    assert info.value.diag.constraint_name == "channel_outbox_job_of_run_fkey"


def test_status_check_refuses_an_unknown_status(conn, outbox_parent):
    item = insert_item(conn, outbox_parent)
    with triggers_off(conn), raises("23514") as info:  # the trigger would refuse it first
        conn.execute("UPDATE channel_outbox SET status = 'delivered' WHERE id = %s", [item])
    assert info.value.diag.constraint_name == "channel_outbox_status_check"


INCONSISTENT_SKIPS = {
    "skipped-not-flagged": {"status": "skipped", "skipped": False, "skip_reason": "unsubscribed"},
    "skipped-without-reason": {"status": "skipped", "skipped": True},
    "flagged-but-pending": {"status": "pending", "skipped": True, "skip_reason": "unsubscribed"},
    "reason-but-pending": {"status": "pending", "skipped": False, "skip_reason": "unsubscribed"},
}


def test_skipped_status_check_refuses_inconsistent_rows(conn, outbox_parent):
    for case, columns in INCONSISTENT_SKIPS.items():
        with raises("23514", case=case) as info:
            insert_item(conn, outbox_parent, **columns)
        assert info.value.diag.constraint_name == "channel_outbox_skipped_status_check", case


def test_skipped_status_check_accepts_a_consistent_skipped_row(conn, outbox_parent):
    item = insert_item(conn, outbox_parent, status="skipped", skipped=True, skip_reason="unsubscribed")
    assert scalar(conn, "SELECT status FROM channel_outbox WHERE id = %s", [item]) == "skipped"


def test_kernel_version(conn):
    version = scalar(conn, "SELECT kernel_version()")
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert scalar(conn, "SELECT max(version) FROM schema_migrations") >= 1
