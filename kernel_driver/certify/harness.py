"""The harness the checks share: the certification tenant, daemons as subprocesses, the local
or real providers, waiting on the database, and one delivery through a provider (E1, V1)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from kernel_driver.certify.records import CheckFailed, CheckRecord, T, expect
from kernel_driver.config import Settings
from kernel_driver.db import wrap_errors
from kernel_driver.queries import TERMINAL_RUN_STATUSES, Kernel
from kernel_driver.testing.seed import SeededCampaign, seed_campaign
from kernel_driver.testing.sinks import SmtpSink, VoiceSink, WebhookSink

CAMPAIGN_NAME_PREFIX = "kernel-certify"  # campaigns.name of every seeded campaign: finds old tenants

SLA_SECONDS = 120.0
WAIT_SECONDS = 60.0  # the longest any step waits for a daemon or a run (Q3 waits for the SLA)
LEASE_SECONDS = 2  # short, so that Q2's second daemon takes the killed daemon's job within seconds
SLOW_PROVIDER_MS = 400  # Q2: a provider call stays in flight this long: the window for the kill
DAEMON_ARGS = ("--poll-interval", "0.2", "--lease-seconds", str(LEASE_SECONDS), "--grace-seconds", "5")



class Daemon:
    """One `kernel-driver run` subprocess; its log goes to a file that failure reasons quote."""

    def __init__(self, worker_id: str, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.worker_id = worker_id
        self.log_path = log_path
        self.killed = False
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def finish(self, timeout: float = WAIT_SECONDS) -> None:
        """Wait for the daemon to exit (--until-idle, or after stop); it must exit 0."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CheckFailed(f"daemon {self.worker_id} still running after {timeout:g} s{self.tail()}") from None
        expect(code == 0, f"daemon {self.worker_id} exited {code}{self.tail()}")

    def stop(self) -> None:
        """SIGTERM: the daemon finishes its calls, releases its job and must exit 0."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.finish()

    def kill(self) -> None:
        self.killed = True
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def failed(self) -> bool:
        """Exited on its own with an error (a daemon certify killed has not failed)."""
        return not self.killed and self.process.poll() not in (None, 0)

    def tail(self, lines: int = 5) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        return ": " + " | ".join(text) if text else ""


def sink_environment(sink: Any) -> dict[str, str]:
    """The secrets a daemon needs to talk to `sink`, under the names its provider settings use."""
    return {"VOICE_SINK_AUTH_TOKEN": sink.auth_token} if isinstance(sink, VoiceSink) else {}


def keys_received(sink: SmtpSink | VoiceSink | WebhookSink) -> Counter[str]:
    """How many requests the provider acted on, per idempotency key."""
    if isinstance(sink, SmtpSink):
        keys = [message.headers.get("X-Idempotency-Key", "") for message in sink.messages]
    elif isinstance(sink, VoiceSink):
        keys = [call.idempotency_token or "" for call in sink.calls]
    else:
        keys = [delivery.idempotency_key for delivery in sink.deliveries]
    return Counter(keys)


# --- the harness ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RealProvider:
    """A real provider for E1 or V1: adapter settings and the address to send to."""

    settings: dict[str, Any]
    to: str


class Certification:
    """What the checks share: the database, the certification tenant, the daemons started."""

    def __init__(
        self,
        conn: psycopg.Connection,
        settings: Settings,
        workdir: Path,
        real_email: RealProvider | None = None,
        real_voice: RealProvider | None = None,
    ) -> None:
        assert settings.dsn is not None
        self.conn = conn
        self.dsn = settings.dsn
        self.schema = settings.schema
        self.workdir = workdir
        self.real_email = real_email
        self.real_voice = real_voice
        self.tenant_id = uuid.uuid4()
        # A second tenant, whose backlog Q3 sends beside the certification tenant's campaigns.
        self.load_tenant_id = uuid.uuid4()
        self.kernel = Kernel(conn, self.schema)
        self._daemons: list[Daemon] = []
        # Kernel functions then refuse anything outside the certification tenant.
        conn.execute("SELECT set_config('execution_kernel.tenant_id', %s, false)", [str(self.tenant_id)])

    @contextlib.contextmanager
    def acting_for(self, tenant_id: uuid.UUID) -> Iterator[None]:
        """The session scoped to another of certify's tenants for a while (seeding the load)."""
        self.conn.execute("SELECT set_config('execution_kernel.tenant_id', %s, false)", [str(tenant_id)])
        try:
            yield
        finally:
            self.conn.execute("SELECT set_config('execution_kernel.tenant_id', %s, false)", [str(self.tenant_id)])

    # SQL

    def rows(self, query: str, *params: Any) -> list[dict[str, Any]]:
        statement = sql.SQL(query).format(schema=sql.Identifier(self.schema))
        with wrap_errors(), self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(statement, params)
            return cur.fetchall()

    def value(self, query: str, *params: Any) -> Any:
        return next(iter(self.rows(query, *params)[0].values()))

    # seeding and deploying

    def campaign(
        self,
        record: CheckRecord,
        channel: str,
        provider: str,
        settings: dict[str, Any],
        contacts: int,
        *,
        tenant_id: uuid.UUID | None = None,
        **options: Any,
    ) -> SeededCampaign:
        seeded = seed_campaign(
            self.conn, self.schema, contacts=contacts, channel=channel, provider=provider,
            settings=settings, tenant_id=tenant_id or self.tenant_id, name=f"{CAMPAIGN_NAME_PREFIX} {record.id}",
            **options,
        )
        record.workspace_ids.append(str(seeded.workspace_id))
        return seeded

    def deploy(self, record: CheckRecord, campaign: SeededCampaign, batch_size: int) -> str:
        run_id = str(self.kernel.deploy_campaign(campaign.campaign_id, batch_size))
        record.run_ids.append(run_id)
        return run_id

    def retry(self, record: CheckRecord, run_id: str) -> str:
        retry_id = str(self.kernel.retry_campaign_run(run_id))
        record.run_ids.append(retry_id)
        return retry_id

    # daemons

    def scoped_dsn(self, application_name: str) -> str:
        """The DSN scoped to the certification tenant for a CLI command (a direct connection:
        session settings are safe here, not behind a transaction pooler), named after the
        command (pg_stat_activity shows which session is whose)."""
        options = conninfo_to_dict(self.dsn).get("options") or ""
        scoped = f"{options} -c execution_kernel.tenant_id={self.tenant_id}".strip()
        return make_conninfo(self.dsn, options=scoped, application_name=application_name)

    def command_environment(self, application_name: str, extra: dict[str, str] | None = None,
                            *, scoped: bool = True) -> dict[str, str]:
        # The DSN travels in the environment, not on the command line where `ps` shows it.
        dsn = self.scoped_dsn(application_name) if scoped else make_conninfo(
            self.dsn, application_name=application_name)
        return {**os.environ, **(extra or {}), "KERNEL_DSN": dsn, "KERNEL_SCHEMA": self.schema}

    def start_daemon(self, record: CheckRecord, name: str, *args: str, env: dict[str, str] | None = None,
                     with_load_tenant: bool = False) -> Daemon:
        """A daemon that claims only the certification tenant's jobs, and the load tenant's
        when asked (--tenant: the tenants go with every call, as behind a pooler)."""
        worker_id = f"certify-{self.tenant_id.hex[:8]}-{name}"
        tenants = [self.tenant_id, self.load_tenant_id] if with_load_tenant else [self.tenant_id]
        command = [sys.executable, "-m", "kernel_driver", "run", "--worker-id", worker_id,
                   *(arg for tenant in tenants for arg in ("--tenant", str(tenant))), *DAEMON_ARGS, *args]
        environment = self.command_environment(worker_id, env, scoped=False)
        daemon = Daemon(worker_id, command, environment, self.workdir / f"{worker_id}.log")
        self._daemons.append(daemon)
        record.workers.append(worker_id)
        return daemon

    def run_daemon_until_idle(
        self, record: CheckRecord, name: str, *args: str, env: dict[str, str] | None = None
    ) -> Daemon:
        daemon = self.start_daemon(record, name, "--until-idle", *args, env=env)
        daemon.finish()
        return daemon

    def wait_listening(self, daemons: Sequence[Daemon]) -> None:
        """Until every daemon has connected and LISTENs for new jobs."""
        names = [daemon.worker_id for daemon in daemons]
        self.wait_until(
            f"daemons {', '.join(names)} to listen for jobs",
            lambda: self.value(
                "SELECT count(DISTINCT application_name) = %s FROM pg_stat_activity"
                " WHERE application_name = ANY(%s) AND query ILIKE 'LISTEN%%'",
                len(names), names,
            ),
        )

    def kill_daemons(self) -> None:
        """Kill whatever a check left running (it failed half-way)."""
        for daemon in self._daemons:
            if daemon.process.poll() is None:
                daemon.kill()
        self._daemons.clear()

    def run_cli(self, *args: str) -> str:
        """`kernel-driver ARGS` as a subprocess in the certification tenant; its stdout."""
        done = subprocess.run(
            [sys.executable, "-m", "kernel_driver", *args], env=self.command_environment("certify-cli"),
            capture_output=True, text=True, timeout=WAIT_SECONDS,
        )
        expect(done.returncode == 0,
               f"`kernel-driver {' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    # waiting

    def wait_until(
        self, what: str, probe: Callable[[], T | None], timeout: float = WAIT_SECONDS, interval: float = 0.02
    ) -> T:
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result:
                return result
            for daemon in self._daemons:
                expect(not daemon.failed(),
                       f"daemon {daemon.worker_id} exited {daemon.process.returncode}{daemon.tail()}")
            if time.monotonic() > deadline:
                raise CheckFailed(f"gave up after {timeout:g} s waiting for {what}")
            time.sleep(interval)

    def wait_for_runs(self, run_ids: Sequence[str], timeout: float = WAIT_SECONDS) -> dict[str, str]:
        """Until every run has ended; their statuses."""

        def statuses() -> dict[str, str] | None:
            rows = self.rows(
                "SELECT id::text, status FROM {schema}.campaign_runs WHERE id = ANY(%s::uuid[])", list(run_ids)
            )
            found = {row["id"]: row["status"] for row in rows}
            return found if set(found.values()) <= TERMINAL_RUN_STATUSES else None

        return self.wait_until(f"runs {', '.join(run_ids)} to end", statuses, timeout)

    # reading back

    def items(self, run_id: str) -> list[dict[str, Any]]:
        return self.rows(
            "SELECT id::text, contact_id::text, status, idempotency_key, recipient, provider_message_id,"
            " error FROM {schema}.channel_outbox WHERE run_id = %s ORDER BY created_at, id",
            run_id,
        )

    def claims_by_worker(self, run_ids: Sequence[str]) -> dict[str, int]:
        """How many times each worker claimed a job of these runs (from the audit trail)."""
        rows = self.rows(
            "SELECT worker, count(*) AS claims FROM {schema}.job_events WHERE run_id = ANY(%s::uuid[])"
            " AND entity = 'job' AND to_status = 'processing' GROUP BY worker ORDER BY worker",
            list(run_ids),
        )
        return {row["worker"]: row["claims"] for row in rows}

    def collect_ids(self, record: CheckRecord) -> None:
        """The ids of every job, item and provider message of the check's runs, for the evidence."""
        if not record.run_ids:
            return
        record.job_ids = [row["id"] for row in self.rows(
            "SELECT id::text FROM {schema}.job_queue WHERE run_id = ANY(%s::uuid[]) ORDER BY created_at, id",
            record.run_ids,
        )]
        items = self.rows(
            "SELECT id::text, provider_message_id FROM {schema}.channel_outbox"
            " WHERE run_id = ANY(%s::uuid[]) ORDER BY created_at, id",
            record.run_ids,
        )
        record.item_ids = [item["id"] for item in items]
        record.provider_message_ids = [item["provider_message_id"] for item in items if item["provider_message_id"]]

    def expect_only_own_workers(self, record: CheckRecord) -> None:
        strangers = set(self.claims_by_worker(record.run_ids)) - set(record.workers)
        expect(
            not strangers,
            f"jobs of this check were claimed by {', '.join(sorted(strangers))}, which certify did not"
            " start: stop unscoped daemons on this database while certifying",
        )






def deliver_one(
    cert: Certification,
    record: CheckRecord,
    channel: str,
    provider: str,
    settings: dict[str, Any],
    *,
    to: str | None = None,
    content: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One contact (with address `to` when given), one daemon run; the item, which must be sent."""
    campaign = cert.campaign(record, channel, provider, settings, 1, content=content)
    if to is not None:
        column = sql.Identifier("email" if channel == "email" else "phone")
        cert.conn.execute(
            sql.SQL("UPDATE {}.contacts SET {} = %s WHERE workspace_id = %s").format(
                sql.Identifier(cert.schema), column
            ),
            [to, campaign.workspace_id],
        )
    run_id = cert.deploy(record, campaign, batch_size=1)
    cert.run_daemon_until_idle(record, record.id.lower(), env=env)
    cert.wait_for_runs([run_id])
    [item] = cert.items(run_id)
    record.measurements.update(
        provider=provider, recipient=item["recipient"], item_status=item["status"],
        provider_message_id=item["provider_message_id"],
    )
    expect(
        item["status"] == "sent" and item["provider_message_id"],
        f"item {item['id']} ended {item['status']} without a provider id: {item['error']}",
    )
    return item
