"""The evidence format: its JSON Schema accepts what certify writes and rejects malformed files;
the pure helpers behind the numbers in it."""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import asdict
from pathlib import Path

import jsonschema
import pytest

from kernel_driver import certify

DOCS = Path(__file__).resolve().parents[2] / "docs"
SCHEMA = json.loads((DOCS / "evidence.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def check(check_id: str, status: str = "PASS", **measurements) -> dict:
    record = certify.CheckRecord(
        check_id, f"title of {check_id}", status=status, reason=None if status == "PASS" else "it broke",
        started_at=certify.utc_now(), ended_at=certify.utc_now(), duration_s=1.5, measurements=measurements,
        workspace_ids=[str(uuid.uuid4())], workers=["certify-1-e1"], run_ids=[str(uuid.uuid4())],
        job_ids=[str(uuid.uuid4())], item_ids=[str(uuid.uuid4())], provider_message_ids=["<a@example.com>"],
    )
    return asdict(record)


def evidence() -> dict:
    """A small valid document: E1 passed, Q3 failed."""
    tenant = str(uuid.uuid4())
    return {
        "format": certify.EVIDENCE_FORMAT,
        "tool": {"name": "kernel-driver", "version": "1.0.0", "python": "3.11.7"},
        "kernel_version": "1.0.0",
        "postgres": {"version": "PostgreSQL 16.2", "version_num": 160002},
        "database": {"host": "db.staging", "port": 5432, "dbname": "app", "user": "kernel_owner", "schema": "kernel"},
        "host": "ci-7",
        "tenant_id": tenant,
        "load_tenant_id": tenant,
        "source": {"commit": "0" * 40, "dirty": False},
        "frozen_files": certify.frozen_file_digests(),
        "providers": {"email": "local SMTP sink", "voice": "local voice sink"},
        "started_at": "2026-11-29T16:52:44.502+00:00",
        "ended_at": "2026-11-29T16:52:59Z",
        "checks": [
            check("E1", provider="smtp", recipient="a@example.com", item_status="sent",
                  provider_message_id="<a@example.com>", server="local SMTP sink smtp://127.0.0.1:2525", received=True),
            check("Q3", status="FAIL"),
        ],
        "summary": {"selected": ["E1", "Q3"], "passed": ["E1"], "failed": ["Q3"], "result": "FAIL"},
        "purge_sql": certify.purge_sql("kernel", [tenant, tenant]),
    }


def errors(document: dict) -> list[str]:
    return [error.message for error in VALIDATOR.iter_errors(document)]


def test_the_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_a_well_formed_document_is_accepted():
    assert errors(evidence()) == []


def mutated(change) -> dict:
    document = copy.deepcopy(evidence())
    change(document)
    return document


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d.pop("kernel_version"), id="missing kernel_version"),
        pytest.param(lambda d: d.update(format="kernel-driver/certification-evidence/0"), id="other format"),
        pytest.param(lambda d: d.update(extra=1), id="unknown top-level field"),
        pytest.param(lambda d: d["frozen_files"][0].update(sha256="abc"), id="short sha256"),
        pytest.param(lambda d: d.update(frozen_files=[]), id="no frozen files"),
        pytest.param(lambda d: d["checks"][1].update(reason=None), id="FAIL without reason"),
        pytest.param(lambda d: d["checks"][0].update(reason="fine"), id="PASS with reason"),
        pytest.param(lambda d: d["checks"][0].update(status="OK"), id="status neither PASS nor FAIL"),
        pytest.param(lambda d: d["checks"][0].update(id="Q9"), id="unknown check id"),
        pytest.param(lambda d: d["checks"][0].update(run_ids=["run-1"]), id="run id not a uuid"),
        pytest.param(lambda d: d["checks"][0].update(run_ids=[]), id="PASS without runs"),
        pytest.param(lambda d: d["checks"][0]["measurements"].update(item_status="failed"),
                     id="E1 PASS with failed item"),
        pytest.param(lambda d: d["checks"][0]["measurements"].pop("provider_message_id"),
                     id="E1 PASS without provider id"),
        pytest.param(lambda d: d["checks"][0].update(started_at="yesterday"), id="timestamp not ISO 8601"),
        pytest.param(lambda d: d["summary"].update(result="PASS"), id="PASS summary with a failed check"),
        pytest.param(lambda d: d.update(tenant_id="not-a-uuid"), id="tenant not a uuid"),
        pytest.param(lambda d: d.update(purge_sql="DROP SCHEMA kernel CASCADE;"), id="purge_sql not deletes"),
    ],
)
def test_malformed_documents_are_rejected(change):
    assert errors(mutated(change))


PASSING_MEASUREMENTS = {
    "Q1": {"contacts": 12, "run_status": "completed", "claims_by_worker": {"a": 6, "b": 6},
           "outbox": {"items": 12, "keys": 12, "contacts": 12, "sent": 12, "events": 27},
           "max_outbox_rows_per_key": 1, "max_provider_calls_per_key": 1, "rows_inserted_by_repeated_reservation": 0},
    "Q3": {"sla_s": 120.0, "campaigns": 6, "jobs": 12, "deploys_spread_over_s": 3.0, "run_statuses": {"completed": 6},
           "pickup_s": {"p50": 1, "p99": 2, "max": 3}, "completion_s": {"p50": 1, "p99": 2, "max": 3}},
    "UX2": {"first_run": {"id": str(uuid.uuid4()), "status": "partial"},
            "retry_run": {"id": str(uuid.uuid4()), "status": "completed", "retry_of_run_id": str(uuid.uuid4()),
                          "root_run_id": str(uuid.uuid4()), "generation": 2},
            "targeted": ["a@example.com"], "deliveries_per_recipient": {"a@example.com": 1},
            "second_retry_refused": True},
}


def passed_alone(check_id: str, **changes) -> dict:
    """A document whose only check is a PASS of `check_id` with PASSING_MEASUREMENTS updated by `changes`."""
    document = evidence()
    document["checks"] = [check(check_id, **{**PASSING_MEASUREMENTS[check_id], **changes})]
    document["summary"] = {"selected": [check_id], "passed": [check_id], "failed": [], "result": "PASS"}
    return document


@pytest.mark.parametrize("check_id", sorted(PASSING_MEASUREMENTS))
def test_a_pass_with_its_measurements_is_accepted(check_id):
    assert errors(passed_alone(check_id)) == []


@pytest.mark.parametrize(
    ("check_id", "changes"),
    [
        ("Q1", {"max_provider_calls_per_key": 2}),
        ("Q1", {"claims_by_worker": {"a": 12}}),
        ("Q3", {"pickup_s": {"p50": 1, "p99": 2, "max": 121}}),
        ("Q3", {"run_statuses": {"completed": 5, "failed": 1}}),
        ("UX2", {"second_retry_refused": False}),
        ("UX2", {"deliveries_per_recipient": {"a@example.com": 2}}),
    ],
    ids=["Q1 duplicate provider call", "Q1 one worker", "Q3 over the SLA", "Q3 failed run", "UX2 second retry accepted",
         "UX2 duplicate delivery"],
)
def test_a_pass_whose_measurements_contradict_it_is_rejected(check_id, changes):
    assert errors(passed_alone(check_id, **changes))


def test_percentiles_are_measured_values():
    values = [0.5, 0.1, 0.3, 0.2, 9.0]
    assert certify.spread(values) == {"p50": 0.3, "p99": 9.0, "max": 9.0}
    assert certify.percentile([4.0], 50) == 4.0


def test_select_checks_keeps_the_harness_order():
    assert [c.id for c in certify.select_checks("ux2,q1, E1")] == ["Q1", "E1", "UX2"]
    assert [c.id for c in certify.select_checks(None)] == list(certify.CHECK_IDS)
    with pytest.raises(ValueError, match="unknown check Q4, X"):
        certify.select_checks("Q1,Q4,x")
    with pytest.raises(ValueError, match=r"\(none given\)"):
        certify.select_checks(" , ")


def test_real_voice_settings_need_a_caller_id():
    settings = {"base_url": "https://api.example.com", "account_sid": "AC1", "auth_token_env": "TOKEN"}
    with pytest.raises(ValueError, match="'from' \\(the caller id\\)"):
        certify.real_provider("twilio", "--voice-settings", json.dumps(settings), "--voice-to", "+15550000001")
    given = certify.real_provider("twilio", "--voice-settings", json.dumps({**settings, "from": "+15551112222"}),
                                  "--voice-to", "+15550000001")
    assert given == certify.RealProvider({**settings, "from": "+15551112222"}, "+15550000001")


def test_frozen_files_are_the_migrations_then_the_named_files():
    files = [path.as_posix() for path in certify.frozen_files()]
    migrations = [name for name in files if name.startswith("sql/migrations/")]
    assert migrations and files[: len(migrations)] == sorted(migrations)
    assert "kernel_driver/certify/q2_crash_recovery.py" in files and "kernel_driver/worker.py" in files


def test_docs_give_the_purge_statements_certify_writes():
    """docs/certification.md shows purge_sql for a psql variable; it must not drift from the code."""
    assert certify.purge_sql("kernel", [":'tenant'", ":'load_tenant'"]) in (DOCS / "certification.md").read_text()
