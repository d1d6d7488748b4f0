"""`kernel-driver demo`: the whole kernel on this machine in one command (`make demo`).

Uses KERNEL_DSN when set, else an embedded PostgreSQL whose data stays in `.demo/pgdata` for the
next time. Migrates, seeds a new demo tenant (an e-mail campaign of 1,000 contacts, some
unsubscribed or without an address, and a voice campaign of 50), sends both through a daemon
subprocess to local SMTP and voice servers, certifies the kernel into `.demo/evidence.json` and
prints what happened. Each run makes a new tenant, so it can be run again and again.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import click
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from kernel_driver import migrate
from kernel_driver.config import Settings
from kernel_driver.db import connect
from kernel_driver.errors import ChecksFailed
from kernel_driver.queries import Kernel
from kernel_driver.runs import table
from kernel_driver.testing.postgres import embedded_postgres
from kernel_driver.testing.seed import SeededCampaign, seed_campaign
from kernel_driver.testing.sinks import SmtpSink, VoiceSink

EMAIL_CONTACTS = 1000
VOICE_CONTACTS = 50
UNSUBSCRIBED_EVERY = 25  # 40 of the e-mail contacts unsubscribed …
NO_ADDRESS_EVERY = 40  # … and 25 without an address (5 are both): 940 reachable
# Four calls at a time: the local voice sink listens with a backlog of 5, and more concurrent
# connects overflow it while this process is busy (refused calls would end `unknown`).
DAEMON_ARGS = ("--until-idle", "--poll-interval", "0.2", "--concurrency", "4", "--log-level", "WARNING")
STATUSES = ("sent", "skipped", "failed", "unknown", "pending")
DAEMON_TIMEOUT_S = 300


class DemoFailed(Exception):
    """The demo ran but something in it did not work; the message says what."""


@contextmanager
def demo_database(dsn: str | None, data_dir: Path) -> Iterator[tuple[str, str]]:
    """The DSN to use and a description of it: KERNEL_DSN, else an embedded PostgreSQL kept in
    ``data_dir/pgdata`` (stopped afterwards; its data stays for the next demo)."""
    if dsn:
        yield dsn, "KERNEL_DSN"
        return
    pgdata = (data_dir / "pgdata").resolve()
    with embedded_postgres(pgdata) as embedded_dsn:
        yield embedded_dsn, f"embedded PostgreSQL, data in {pgdata}"


@dataclass(frozen=True)
class DemoRun:
    channel: str
    campaign: SeededCampaign
    run_id: UUID


def seed_and_deploy(conn: psycopg.Connection, schema: str, smtp: SmtpSink, voice: VoiceSink) -> list[DemoRun]:
    """One new tenant with an e-mail and a voice campaign (each in its own workspace), deployed."""
    email = seed_campaign(
        conn, schema, contacts=EMAIL_CONTACTS, provider="smtp", settings=smtp.provider_settings(),
        unsubscribed_every=UNSUBSCRIBED_EVERY, no_address_every=NO_ADDRESS_EVERY, name="demo e-mail",
    )
    voice_campaign = seed_campaign(
        conn, schema, contacts=VOICE_CONTACTS, channel="voice", provider="twilio",
        settings=voice.provider_settings(), tenant_id=email.tenant_id, name="demo voice",
    )
    kernel = Kernel(conn, schema)
    return [DemoRun(channel, campaign, kernel.deploy_campaign(campaign.campaign_id))
            for channel, campaign in (("email", email), ("voice", voice_campaign))]


def run_daemon(settings: Settings, dsn: str, tenant_id: UUID, env: dict[str, str], log_path: Path,
               kernel: Kernel, runs: list[DemoRun]) -> float:
    """Run the daemon until both runs are done, with a progress bar; its wall time in seconds.

    The daemon's sessions are scoped to the demo tenant, so it never claims anyone else's job.
    """
    options = conninfo_to_dict(dsn).get("options") or ""
    scoped = make_conninfo(dsn, options=f"{options} -c execution_kernel.tenant_id={tenant_id}".strip())
    command = [sys.executable, "-m", "kernel_driver", "run", *DAEMON_ARGS]
    # The DSN travels in the environment, where `ps` does not show it.
    daemon_env = {**os.environ, **env, "KERNEL_DSN": scoped, "KERNEL_SCHEMA": settings.schema}
    total = sum(run.campaign.contacts for run in runs)
    started = time.monotonic()
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(command, env=daemon_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with click.progressbar(length=total, label="sending", show_pos=True) as bar:
            while (exit_code := daemon.poll()) is None:
                bar.update(finished_items(kernel, runs) - bar.pos)
                if time.monotonic() - started > DAEMON_TIMEOUT_S:
                    raise DemoFailed(f"the daemon did not finish within {DAEMON_TIMEOUT_S} s; its log: {log_path}")
                time.sleep(0.2)
            bar.update(finished_items(kernel, runs) - bar.pos)
    finally:
        if daemon.poll() is None:  # the demo failed half-way: leave no daemon behind
            daemon.kill()
            daemon.wait()
    if exit_code != 0:
        raise DemoFailed(f"the daemon exited {exit_code}; its log: {log_path}")
    return time.monotonic() - started


def finished_items(kernel: Kernel, runs: list[DemoRun]) -> int:
    """Items that reached a terminal status, over both runs."""
    done = 0
    for run in runs:
        counts = kernel.run_details(run.run_id, 0)["item_counts"]
        done += sum(n for status, n in counts.items() if status != "pending")
    return done


@contextmanager
def console_for(dsn: str, schema: str, tenant_id: UUID, data_dir: Path) -> Iterator[str | None]:
    """`kernel-driver ui` over the demo's database while the demo runs: the sign-in address of
    the demo tenant's token, or None when the ui extra is not installed."""
    try:
        import flask  # noqa: F401  (the ui extra)
    except ModuleNotFoundError:
        yield None
        return
    token = secrets.token_urlsafe(24)
    tokens = data_dir / "console-tokens"
    tokens.write_text(f"admin {secrets.token_urlsafe(24)}\ntenant {tenant_id} {token}\n")
    tokens.chmod(0o600)
    command = [sys.executable, "-m", "kernel_driver", "ui", "--bind", "127.0.0.1:0", "--tokens", str(tokens),
               "--threads", "4"]
    with (data_dir / "console.log").open("wb") as log:
        console = subprocess.Popen(command, env={**os.environ, "KERNEL_DSN": dsn, "KERNEL_SCHEMA": schema},
                                   stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert console.stdout is not None
        first = console.stdout.readline()  # "console: http://127.0.0.1:PORT/ (kernel …)"
        yield f"{first.split()[1]}login?token={token}" if first.startswith("console: ") else None
    finally:
        console.terminate()
        console.wait(10)


def certify_into(evidence: Path, dsn: str, schema: str) -> dict[str, Any]:
    """`kernel-driver certify` (its progress lines show); the evidence it wrote."""
    env = {**os.environ, "KERNEL_DSN": dsn, "KERNEL_SCHEMA": schema}
    command = [sys.executable, "-m", "kernel_driver", "certify", "--out", str(evidence)]
    evidence.unlink(missing_ok=True)  # the last demo's must not pass for this one's
    done = subprocess.run(command, env=env, check=False)
    if not evidence.exists():
        raise DemoFailed(f"kernel-driver certify exited {done.returncode} without writing {evidence}")
    written: dict[str, Any] = json.loads(evidence.read_text())
    return written


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def summary(kernel: Kernel, runs: list[DemoRun], sinks: dict[str, int], daemon_s: float,
            evidence_path: Path, evidence: dict[str, Any]) -> tuple[str, list[str]]:
    """The summary text, and what did not work (empty when everything did)."""
    rows, problems, total = [], [], 0
    for run in runs:
        details = kernel.run_details(run.run_id, 0)
        status, counts = details["run"]["status"], details["item_counts"]
        items = sum(counts.values())
        total += items
        took = seconds_between(details["run"]["started_at"], details["run"]["completed_at"])
        rate = f"{items / took:.0f}" if took else "-"
        rows.append((run.channel, str(run.run_id), status, *(counts.get(s, 0) for s in STATUSES), items, rate))
        if status != "completed":
            problems.append(f"the {run.channel} run {run.run_id} ended {status}")
    checks = [(check["id"], check["status"]) for check in evidence["checks"]]
    problems += [f"certification check {check} {status}" for check, status in checks if status != "PASS"]
    lines = [
        "",
        f"demo tenant {runs[0].campaign.tenant_id}",
        *table(("RUN", "ID", "STATUS", *(s.upper() for s in STATUSES), "ITEMS", "ITEMS/S"), rows),
        "",
        f"daemon:    {total} items in {daemon_s:.1f} s ({total / daemon_s:.0f} items/s overall)",
        "sinks:     " + ", ".join(f"{what} {n}" for what, n in sinks.items()),
        f"evidence:  {evidence_path}",
        "checks:    " + "  ".join(f"{check} {status}" for check, status in checks),
        f"result:    {'PASS' if not problems else 'FAIL'}",
    ]
    return "\n".join(lines), problems


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".demo"),
              show_default=True, help="Where the embedded database, the daemon log and the evidence go.")
@click.option("--keep-console", is_flag=True, help="Keep the web console (and the embedded database) up after"
              " the demo, until Ctrl-C.")
@click.pass_obj
def demo(settings: Settings, data_dir: Path, keep_console: bool) -> None:
    """Run the kernel end to end here: migrate, seed, send 1,050 items to local servers, certify.

    Uses KERNEL_DSN when set, else an embedded PostgreSQL kept in DATA_DIR/pgdata. Every run
    seeds a new tenant. Exit 0 when both runs completed and every certification check passed.
    """

    try:
        run_demo(settings, data_dir, keep_console)
    except DemoFailed as exc:
        raise ChecksFailed(str(exc)) from exc


def run_demo(settings: Settings, data_dir: Path, keep_console: bool = False) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    evidence_path = data_dir / "evidence.json"
    with demo_database(settings.dsn, data_dir) as (dsn, where), connect(dsn, autocommit=True) as conn:
        click.echo(f"database:  {where} (schema {settings.schema})")
        files = migrate.load_migrations()
        applied = [m.name for action, m in migrate.migrate(conn, settings.schema, files) if action == "applied"]
        version = migrate.kernel_version(conn, settings.schema)
        click.echo(f"kernel:    {version} ({'applied ' + ', '.join(applied) if applied else 'already migrated'})")
        kernel = Kernel(conn, settings.schema)
        with SmtpSink() as smtp, VoiceSink() as voice:
            runs = seed_and_deploy(conn, settings.schema, smtp, voice)
            email, voice_run = runs
            click.echo(
                f"seeded:    tenant {email.campaign.tenant_id}: e-mail campaign of {email.campaign.contacts} "
                f"contacts ({email.campaign.reachable} reachable), voice campaign of {voice_run.campaign.contacts}"
            )
            click.echo(f"sinks:     SMTP at {smtp.url}, voice at {voice.url}")
            with console_for(dsn, settings.schema, email.campaign.tenant_id, data_dir) as console:
                if console is None:
                    click.echo("console:   pip install '.[ui]' to watch the demo in a browser")
                else:
                    click.echo(f"console:   {console} (the demo tenant's runs, live, while the demo runs)")
                env = {"VOICE_SINK_AUTH_TOKEN": voice.auth_token}
                daemon_s = run_daemon(settings, dsn, email.campaign.tenant_id, env, data_dir / "daemon.log",
                                      kernel, runs)
                sinks = {"SMTP messages received": len(smtp.messages), "voice calls received": len(voice.calls)}
                click.echo(f"certifying into {evidence_path} (Q1-Q3, E1, V1, UX1, UX2) …")
                evidence = certify_into(evidence_path, dsn, settings.schema)
                text, problems = summary(kernel, runs, sinks, daemon_s, evidence_path, evidence)
                click.echo(text)
                if keep_console and console:
                    click.echo(f"console:   still at {console}; Ctrl-C ends it")
                    wait_for_interrupt()
    if problems:
        raise DemoFailed("the demo did not fully work: " + "; ".join(problems))


def wait_for_interrupt() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("")
