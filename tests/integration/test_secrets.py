"""Secrets never leave the environment (issue 12, item 4). A planted secret for each adapter
(an SMTP password, a Twilio auth token, a webhook signing secret, and an SMTP password the
server refuses) goes through a whole life cycle: four campaigns sent by a real daemon logging
JSON at DEBUG with its metrics served, a refused login recorded as failed items, `runs show`
and `runs list`, every page of the console, and a certification's evidence. Then each secret is
looked for in every row of every table of the database, the daemon's log, the metrics page, the
CLI's output, the console's HTML and the evidence: it is in none of them."""

from __future__ import annotations

import json
import secrets
import socket
import time
import urllib.request

from psycopg import sql
from psycopg_pool import ConnectionPool

from kernel_driver.config import Settings
from kernel_driver.console.app import Console, create_app
from kernel_driver.console.auth import Access, Tokens
from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from kernel_driver.testing.sinks import SmtpSink, VoiceSink, WebhookSink
from tests.integration.daemon import item_counts, start_daemon

ADMIN = "secrets-test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def every_row(conn) -> str:
    """Every row of every table of the database, as text."""
    tables = conn.execute(
        "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables").fetchall()
    return "\n".join(
        conn.execute(sql.SQL("SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {} AS t").format(
            sql.SQL(table))).fetchone()[0]
        for (table,) in tables)


def test_a_planted_secret_appears_nowhere(conn, db_dsn, kernel_schema, cli, tmp_path):
    planted = {name: f"planted-{name.lower()}-{secrets.token_hex(12)}" for name in (
        "SMTP_SINK_PASSWORD", "VOICE_SINK_AUTH_TOKEN", "WEBHOOK_SINK_SECRET", "WRONG_SMTP_PASSWORD")}
    env = {**planted, "SMTP_SINK_USERNAME": "kernel"}
    kernel = Kernel(conn, kernel_schema)
    with (SmtpSink(credentials=("kernel", planted["SMTP_SINK_PASSWORD"])) as smtp,
          VoiceSink(auth_token=planted["VOICE_SINK_AUTH_TOKEN"]) as voice,
          WebhookSink(secret=planted["WEBHOOK_SINK_SECRET"]) as hook):
        wrong = {**smtp.provider_settings(), "password_env": "WRONG_SMTP_PASSWORD"}
        seeds = [
            seed_campaign(conn, kernel_schema, contacts=5, provider="smtp", settings=smtp.provider_settings()),
            seed_campaign(conn, kernel_schema, contacts=5, channel="voice", provider="twilio",
                          settings=voice.provider_settings()),
            seed_campaign(conn, kernel_schema, contacts=5, provider="webhook", settings=hook.provider_settings()),
            seed_campaign(conn, kernel_schema, contacts=5, provider="smtp", settings=wrong, name="refused login"),
        ]
        runs = [kernel.deploy_campaign(seed.campaign_id) for seed in seeds]
        port = free_port()
        daemon = start_daemon(db_dsn, kernel_schema, "--log-format", "json", "--log-level", "DEBUG",
                              "--metrics-port", str(port), env=env)
        deadline = time.monotonic() + 60
        while any(status in ("queued", "running") for (status,) in conn.execute(
                "SELECT status FROM campaign_runs WHERE id = ANY(%s)", (runs,))):
            assert time.monotonic() < deadline, daemon.output()[-3000:]
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        log = daemon.stop()
        assert len(smtp.messages) == 5 and len(voice.calls) == 5 and len(hook.deliveries) == 5

        # The refused login failed its items, with the server's answer and not the password.
        assert item_counts(conn, [runs[3]]) == {"failed": 5}
        errors = [e for (e,) in conn.execute("SELECT error FROM channel_outbox WHERE run_id = %s", (runs[3],))]
        assert all("535" in error or "auth" in error.lower() for error in errors), errors

        evidence = tmp_path / "evidence.json"
        certified = cli("--dsn", db_dsn, "--schema", kernel_schema, "certify", "--only", "E1", "--out",
                        str(evidence), "--smtp-settings", json.dumps(smtp.provider_settings()),
                        "--email-to", "qa@example.com", env=env)
        assert certified.exit_code == 0, certified.output

    shown = [cli("--dsn", db_dsn, "--schema", kernel_schema, "runs", "show", str(run), "--json").output
             for run in runs]
    shown.append(cli("--dsn", db_dsn, "--schema", kernel_schema, "runs", "list", "--json").output)
    with ConnectionPool(db_dsn, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        client = create_app(Console(Settings(dsn=db_dsn, schema=kernel_schema),
                                    Tokens([(ADMIN, Access(None))]), pool)).test_client()
        urls = ["/", "/campaigns", *(f"/runs/{run}" for run in runs),
                *(f"/campaigns/{seed.campaign_id}" for seed in seeds)]
        pages = [client.get(url, headers={"Authorization": f"Bearer {ADMIN}"}).text for url in urls]

    places = {"database": every_row(conn), "daemon log": log, "metrics": metrics,
              "evidence": evidence.read_text(), "cli": "\n".join(shown), "console": "\n".join(pages)}
    assert "refused login" in places["console"] and "smtp" in places["database"]  # they were read
    leaks = {(name, where) for name, secret in planted.items() for where, text in places.items() if secret in text}
    assert leaks == set()
