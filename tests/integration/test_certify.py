"""`kernel-driver certify` end to end: a real database, real daemons, real provider sinks."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import jsonschema
import pytest

from kernel_driver import certify
from kernel_driver.errors import ExitCode
from kernel_driver.testing.sinks import SmtpSink, VoiceSink
from tests.integration.daemon import start_daemon

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "evidence.schema.json").read_text())


def validate(evidence: dict) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    validator.validate(evidence)


@pytest.fixture
def certify_cli(cli, db_dsn, kernel_schema, tmp_path):
    """`kernel-driver certify ARGS` against the test database; (result, evidence or None)."""

    def run(*args: str):
        out = tmp_path / "evidence.json"
        result = cli("--dsn", db_dsn, "--schema", kernel_schema, "certify", "--out", str(out), *args)
        return result, json.loads(out.read_text()) if out.exists() else None

    return run


def test_every_check_passes_and_the_evidence_follows_its_schema(certify_cli, conn):
    result, evidence = certify_cli()

    assert result.exit_code == 0, result.output
    assert [line.split()[:2] for line in result.output.splitlines()[:7]] == [
        ["PASS", check_id] for check_id in certify.CHECK_IDS
    ]
    validate(evidence)
    assert evidence["summary"] == {
        "selected": list(certify.CHECK_IDS), "passed": list(certify.CHECK_IDS), "failed": [], "result": "PASS",
    }
    assert evidence["kernel_version"] == conn.execute("SELECT kernel_version()").fetchone()[0]
    assert {entry["path"]: entry["sha256"] for entry in evidence["frozen_files"]} == {
        entry["path"]: entry["sha256"] for entry in certify.frozen_file_digests()
    }
    checks = {check["id"]: check for check in evidence["checks"]}
    assert checks["Q3"]["measurements"]["pickup_s"]["max"] < certify.SLA_SECONDS
    for scenario in checks["Q2"]["measurements"]["scenarios"]:
        assert 1 <= scenario["in_flight_at_kill"] <= certify.Q2_CONCURRENCY
    # every id the evidence names is a row of the certification tenant
    run_ids = [run_id for check in evidence["checks"] for run_id in check["run_ids"]]
    tenants = conn.execute(
        "SELECT DISTINCT tenant_id::text FROM campaign_runs WHERE id = ANY(%s::uuid[])", (run_ids,)
    ).fetchall()
    assert tenants == [(evidence["tenant_id"],)]
    item_ids = [item_id for check in evidence["checks"] for item_id in check["item_ids"]]
    found = conn.execute("SELECT count(*) FROM channel_outbox WHERE id = ANY(%s::uuid[])", (item_ids,)).fetchone()
    assert found[0] == len(item_ids)


def test_only_runs_the_named_checks_and_purge_sql_removes_their_rows(certify_cli, conn):
    other = conn.execute("SELECT count(*) FROM campaigns").fetchone()[0]
    result, evidence = certify_cli("--only", "ux1, e1")

    assert result.exit_code == 0, result.output
    assert [check["id"] for check in evidence["checks"]] == ["E1", "UX1"]  # the harness's order
    validate(evidence)

    conn.execute(evidence["purge_sql"])
    tenant = evidence["tenant_id"]
    tables = ("campaigns", "contacts", "provider_configs", "campaign_runs", "job_queue", "channel_outbox", "job_events")
    for table in tables:
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE tenant_id = %s", (tenant,)).fetchone()[0] == 0, table
    assert conn.execute("SELECT count(*) FROM campaigns").fetchone()[0] == other


def test_e1_and_v1_go_through_the_providers_given(cli, db_dsn, kernel_schema, tmp_path):
    """--smtp-settings/--voice-settings: here real servers on this machine stand in for the providers."""
    out = tmp_path / "evidence.json"
    with SmtpSink() as smtp, VoiceSink() as voice:
        voice_settings = voice.provider_settings(auth_token_env="CERTIFY_TEST_VOICE_TOKEN")
        result = cli(
            "--dsn", db_dsn, "--schema", kernel_schema, "certify", "--out", str(out), "--only", "E1,V1",
            "--smtp-settings", json.dumps(smtp.provider_settings()), "--email-to", "qa-inbox@example.com",
            "--voice-settings", json.dumps(voice_settings), "--voice-to", "+15557654321",
            env={"CERTIFY_TEST_VOICE_TOKEN": voice.auth_token},  # secrets come from the environment
        )
        messages, calls = smtp.messages, voice.calls
    evidence = json.loads(out.read_text())

    assert result.exit_code == 0, result.output
    validate(evidence)
    assert evidence["providers"] == {"email": "real", "voice": "real"}
    e1, v1 = evidence["checks"]
    assert [m.rcpt_tos for m in messages] == [("qa-inbox@example.com",)]
    assert e1["provider_message_ids"] == [messages[0].message_id]
    assert "confirm receipt in the inbox" in e1["measurements"]["received"]
    assert [(c.to, c.from_) for c in calls] == [("+15557654321", voice_settings["from"])]
    assert v1["provider_message_ids"] == [calls[0].sid]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


def test_e1_fails_when_the_smtp_server_refuses_connections(certify_cli):
    settings = {"host": "127.0.0.1", "port": closed_port(), "from": "certify@example.com", "timeout_s": 2}
    result, evidence = certify_cli("--only", "E1", "--smtp-settings", json.dumps(settings),
                                   "--email-to", "qa@example.com")

    assert result.exit_code == ExitCode.FAILED, result.output
    assert result.output.startswith("FAIL E1 ")
    validate(evidence)
    [check] = evidence["checks"]
    assert check["status"] == "FAIL"
    assert "ended failed" in check["reason"] and "Connection refused" in check["reason"]
    assert evidence["providers"]["email"] == "real"
    assert evidence["summary"]["result"] == "FAIL"


def test_e1_fails_when_the_server_refuses_the_mailbox(certify_cli):
    with SmtpSink() as sink:
        sink.reject_rcpt = {"nobody@example.com"}
        result, evidence = certify_cli(
            "--only", "E1", "--smtp-settings", json.dumps(sink.provider_settings()), "--email-to", "nobody@example.com"
        )
    assert result.exit_code == ExitCode.FAILED
    [check] = evidence["checks"]
    assert "550" in check["reason"]
    assert check["run_ids"] and check["item_ids"] and not check["provider_message_ids"]


def test_a_check_fails_when_a_daemon_certify_did_not_start_takes_its_job(certify_cli, db_dsn, kernel_schema, conn):
    """An unscoped daemon already running (say, staging's) must not certify the kernel for us."""
    stranger = start_daemon(db_dsn, kernel_schema, "--worker-id", "staging-daemon")
    try:
        # The stranger's own LISTEN, in this database (another test's daemon may listen elsewhere).
        listening = ("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%%'"
                     " AND datname = current_database() AND pid <> pg_backend_pid()")
        while conn.execute(listening).fetchone()[0] == 0:
            assert stranger.poll() is None, stranger.output()
            time.sleep(0.05)
        result, evidence = certify_cli("--only", "E1")
    finally:
        stranger.stop(timeout=10)
    assert result.exit_code == ExitCode.FAILED
    [check] = evidence["checks"]
    assert "claimed by staging-daemon, which certify did not start" in check["reason"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "Q1,Q9"], "error: unknown check Q9 in --only; known: Q1, Q2, Q3, E1, V1, UX1, UX2"),
        (["--smtp-settings", "{}"], "error: --smtp-settings and --email-to go together"),
        (["--voice-settings", "{", "--voice-to", "+15550000001"], "error: --voice-settings is not valid JSON"),
        (["--smtp-settings", '{"host": "mx"}', "--email-to", "a@example.com"],
         "error: --smtp-settings: smtp setting 'port' is required"),
        (["--out", "/nonexistent/dir/evidence.json"], "error: cannot write /nonexistent/dir/evidence.json"),
    ],
)
def test_usage_mistakes_exit_2_with_one_line(cli, args, message):
    result = cli("--dsn", "postgresql://127.0.0.1:1/none", "certify", *args)
    assert result.exit_code == 2
    assert result.output.startswith(message) and result.output.count("\n") == 1


def test_unreachable_database_exits_4(cli, tmp_path):
    result = cli("--dsn", f"postgresql://127.0.0.1:{closed_port()}/none", "certify", "--out", str(tmp_path / "e.json"))
    assert result.exit_code == 4
    assert result.output.startswith("error: cannot connect to the database")
    assert not (tmp_path / "e.json").exists()


def test_database_without_the_kernel_exits_6(cli, empty_db_dsn, kernel_schema, tmp_path):
    result = cli("--dsn", empty_db_dsn, "--schema", kernel_schema, "certify", "--out", str(tmp_path / "e.json"))
    assert result.exit_code == 6
    assert result.output == f"error: no kernel in schema {kernel_schema}: run kernel-driver migrate first\n"
