"""`kernel-driver certify`: the seed's QA certification harness, run against a live database.

Checks (docs/certification.md says what each one proves): Q1 idempotency, Q2 crash recovery,
Q3 scheduler SLA, E1 e-mail, V1 voice, UX1 run details, UX2 retry.

Every check works in workspaces of its own under a certification tenant made up for this
invocation (random uuids): it seeds its own campaigns, contacts and provider configs there, drives
real `kernel-driver run` subprocesses against real provider servers (local sinks by default), and
reads the outcome back from the database. The daemons it starts are scoped to that tenant, so they
never claim a real job. The rows stay behind: they are the evidence (`purge_sql` removes them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from kernel_driver import __version__, freeze, migrate
from kernel_driver.config import Settings
from kernel_driver.db import NothingToRetry, database, wrap_errors
from kernel_driver.errors import BadUsage, DatabaseError, ExitCode
from kernel_driver.frozen import CHECK_IDS
from kernel_driver.providers import ProviderConfigError, load_adapter
from kernel_driver.queries import TERMINAL_RUN_STATUSES, Kernel
from kernel_driver.testing.seed import SeededCampaign, default_content, seed_campaign
from kernel_driver.testing.sinks import SmtpSink, VoiceSink, WebhookSink

EVIDENCE_FORMAT = "kernel-driver/certification-evidence/1"
CAMPAIGN_NAME_PREFIX = "kernel-certify"  # campaigns.name of every seeded campaign: finds old tenants

SLA_SECONDS = 120.0
WAIT_SECONDS = 60.0  # the longest any step waits for a daemon or a run (Q3 waits for the SLA)
LEASE_SECONDS = 2  # short, so that Q2's second daemon takes the killed daemon's job within seconds
SLOW_PROVIDER_MS = 400  # Q2: a provider call stays in flight this long: the window for the kill
DAEMON_ARGS = ("--poll-interval", "0.2", "--lease-seconds", str(LEASE_SECONDS), "--grace-seconds", "5")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


T = TypeVar("T")


# --- frozen files -------------------------------------------------------------------------------


def frozen_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """The frozen kernel's files present under `root`, relative to it (the list is the freeze
    gate's, kernel_driver.freeze). Changing any of them needs a new certification."""
    return [path for path in freeze.frozen_files(root) if (root / path).is_file()]


def frozen_file_digests(root: Path = PROJECT_ROOT) -> list[dict[str, str]]:
    return [
        {"path": path.as_posix(), "sha256": hashlib.sha256((root / path).read_bytes()).hexdigest()}
        for path in frozen_files(root)
    ]


# --- what a check records -----------------------------------------------------------------------


class CheckFailed(Exception):
    """An expectation of a check was not met; the message becomes the evidence's `reason`."""


def expect(condition: object, reason: str) -> None:
    if not condition:
        raise CheckFailed(reason)


@dataclass
class CheckRecord:
    id: str
    title: str
    status: str = "FAIL"
    reason: str | None = None
    started_at: str = ""
    ended_at: str = ""
    duration_s: float = 0.0
    measurements: dict[str, Any] = field(default_factory=dict)
    workspace_ids: list[str] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)
    provider_message_ids: list[str] = field(default_factory=list)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def spread(values: Sequence[float]) -> dict[str, float]:
    return {name: round(percentile(values, p), 3) for name, p in (("p50", 50), ("p99", 99), ("max", 100))}


# --- daemons ------------------------------------------------------------------------------------


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
        self.kernel = Kernel(conn, self.schema)
        self._daemons: list[Daemon] = []
        # Kernel functions then refuse anything outside the certification tenant.
        conn.execute("SELECT set_config('execution_kernel.tenant_id', %s, false)", [str(self.tenant_id)])

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
        **options: Any,
    ) -> SeededCampaign:
        seeded = seed_campaign(
            self.conn, self.schema, contacts=contacts, channel=channel, provider=provider,
            settings=settings, tenant_id=self.tenant_id, name=f"{CAMPAIGN_NAME_PREFIX} {record.id}",
            **options,
        )
        record.workspace_ids.append(str(seeded.workspace_id))
        return seeded

    def deploy(self, record: CheckRecord, campaign: SeededCampaign, batch_size: int) -> str:
        run_id = str(self.value("SELECT {schema}.deploy_campaign(%s, %s)", campaign.campaign_id, batch_size))
        record.run_ids.append(run_id)
        return run_id

    def retry(self, record: CheckRecord, run_id: str) -> str:
        retry_id = str(self.value("SELECT {schema}.retry_campaign_run(%s)", run_id))
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

    def start_daemon(self, record: CheckRecord, name: str, *args: str, env: dict[str, str] | None = None) -> Daemon:
        """A daemon that claims only the certification tenant's jobs (--tenant: the tenant
        goes with every call, as behind a pooler)."""
        worker_id = f"certify-{self.tenant_id.hex[:8]}-{name}"
        command = [sys.executable, "-m", "kernel_driver", "run", "--worker-id", worker_id,
                   "--tenant", str(self.tenant_id), *DAEMON_ARGS, *args]
        environment = self.command_environment(worker_id, env, scoped=False)
        daemon = Daemon(worker_id, command, environment, self.workdir / f"{worker_id}.log")
        self._daemons.append(daemon)
        record.workers.append(worker_id)
        return daemon

    def run_daemon_until_idle(self, record: CheckRecord, name: str, *args: str, env: dict[str, str] | None = None) -> Daemon:
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
        expect(done.returncode == 0, f"`kernel-driver {' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    # waiting

    def wait_until(self, what: str, probe: Callable[[], T], timeout: float = WAIT_SECONDS, interval: float = 0.02) -> T:
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result:
                return result
            for daemon in self._daemons:
                expect(not daemon.failed(), f"daemon {daemon.worker_id} exited {daemon.process.returncode}{daemon.tail()}")
            if time.monotonic() > deadline:
                raise CheckFailed(f"gave up after {timeout:g} s waiting for {what}")
            time.sleep(interval)

    def wait_for_runs(self, run_ids: Sequence[str], timeout: float = WAIT_SECONDS) -> dict[str, str]:
        """Until every run has ended; their statuses."""

        def statuses() -> dict[str, str] | None:
            rows = self.rows("SELECT id::text, status FROM {schema}.campaign_runs WHERE id = ANY(%s::uuid[])", list(run_ids))
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


# --- Q1 idempotency -----------------------------------------------------------------------------

Q1_CONTACTS = 20


def outbox_summary(cert: Certification, run_id: str) -> dict[str, int]:
    return cert.rows(
        "SELECT count(*) AS items, count(DISTINCT idempotency_key) AS keys,"
        " count(DISTINCT contact_id) AS contacts, count(*) FILTER (WHERE status = 'sent') AS sent,"
        " (SELECT count(*) FROM {schema}.job_events WHERE run_id = %s) AS events"
        " FROM {schema}.channel_outbox WHERE run_id = %s",
        run_id, run_id,
    )[0]


def reinsert_outbox_rows(cert: Certification, run_id: str) -> int:
    """Insert every item of the run again, as a repeated reservation would, then roll back:
    `ON CONFLICT (idempotency_key) DO NOTHING` must insert none of them."""
    with cert.conn.transaction(force_rollback=True):
        return cert.conn.execute(
            sql.SQL(
                "INSERT INTO {schema}.channel_outbox (run_id, job_id, tenant_id, workspace_id, channel,"
                " provider, idempotency_key, contact_id, recipient, root_run_id, generation)"
                " SELECT run_id, job_id, tenant_id, workspace_id, channel, provider, idempotency_key,"
                " contact_id, recipient, root_run_id, generation FROM {schema}.channel_outbox"
                " WHERE run_id = %s ON CONFLICT (idempotency_key) DO NOTHING"
            ).format(schema=sql.Identifier(cert.schema)),
            [run_id],
        ).rowcount


def check_idempotency(cert: Certification, record: CheckRecord) -> None:
    """Two daemons race for one campaign's jobs; a third runs after it finished."""
    # Each racer sends one message at a time, and the sink answers none until two have arrived:
    # both daemons must have claimed a job, however fast one of them is to wake up.
    with SmtpSink(rendezvous=2) as sink:
        campaign = cert.campaign(record, "email", "smtp", sink.provider_settings(), Q1_CONTACTS)
        racers = [cert.start_daemon(record, f"q1-{n}", "--concurrency", "1") for n in (1, 2)]
        cert.wait_listening(racers)
        run_id = cert.deploy(record, campaign, batch_size=1)  # one job per contact, for both to take
        status = cert.wait_for_runs([run_id])[run_id]
        for daemon in racers:
            daemon.stop()
        claims = cert.claims_by_worker([run_id])
        before, received_before = outbox_summary(cert, run_id), keys_received(sink)

        cert.run_daemon_until_idle(record, "q1-again")
        after, received = outbox_summary(cert, run_id), keys_received(sink)
        reinserted = reinsert_outbox_rows(cert, run_id)

    record.measurements = {
        "contacts": Q1_CONTACTS,
        "run_status": status,
        "claims_by_worker": claims,
        "outbox": after,
        "max_outbox_rows_per_key": after["items"] - after["keys"] + 1,
        "max_provider_calls_per_key": max(received.values(), default=0),
        "rows_inserted_by_repeated_reservation": reinserted,
    }
    expect(status == "completed", f"run {run_id} ended {status}, not completed")
    expect(len(claims) == 2, f"jobs were claimed by {claims}: the two daemons did not both work on the campaign")
    expect(
        after["items"] == after["keys"] == after["contacts"] == after["sent"] == Q1_CONTACTS,
        f"expected {Q1_CONTACTS} sent items, one per key and contact; found {after}",
    )
    expect(
        len(received) == Q1_CONTACTS and set(received.values()) == {1},
        f"the SMTP server did not receive each of the {Q1_CONTACTS} keys exactly once: {dict(received)}",
    )
    expect(
        (after, received) == (before, received_before),
        f"a daemon run after the run ended changed it: outbox {before} -> {after}",
    )
    expect(reinserted == 0, f"re-inserting the run's items added {reinserted} rows")


# --- Q2 crash recovery ---------------------------------------------------------------------------

Q2_CONTACTS = 6
Q2_CONCURRENCY = 2  # provider calls in flight at once: the most items the kill can leave unknown


@dataclass(frozen=True)
class CrashScenario:
    provider: str
    channel: str
    sink: Callable[[], SmtpSink | VoiceSink | WebhookSink]
    in_flight_ends: str  # the status an item in flight at the kill must end with


CRASH_SCENARIOS = (
    CrashScenario("twilio", "voice", VoiceSink, "unknown"),  # does not deduplicate: never re-sent
    CrashScenario("webhook", "email", WebhookSink, "sent"),  # deduplicates by key: re-sent once
)


def dispatched_pending(cert: Certification, run_id: str) -> dict[str, str]:
    """Items handed to the provider whose outcome is not recorded: item id -> idempotency key."""
    rows = cert.rows(
        "SELECT id::text, idempotency_key FROM {schema}.channel_outbox"
        " WHERE run_id = %s AND status = 'pending' AND dispatched_at IS NOT NULL",
        run_id,
    )
    return {row["id"]: row["idempotency_key"] for row in rows}


def calls_in_flight(cert: Certification, run_id: str, sink: Any) -> list[str]:
    """Dispatched, unrecorded items whose request the provider has already received."""
    received = keys_received(sink)
    return [item_id for item_id, key in dispatched_pending(cert, run_id).items() if key in received]


def crash_and_recover(cert: Certification, record: CheckRecord, scenario: CrashScenario) -> dict[str, Any]:
    """SIGKILL a daemon while provider calls are in flight, restart one, check every item."""
    with scenario.sink() as sink:
        sink.slow_ms = SLOW_PROVIDER_MS
        env = sink_environment(sink)
        campaign = cert.campaign(record, scenario.channel, scenario.provider, sink.provider_settings(), Q2_CONTACTS)
        run_id = cert.deploy(record, campaign, batch_size=Q2_CONTACTS)
        victim = cert.start_daemon(record, f"q2-{scenario.provider}-1", "--concurrency", str(Q2_CONCURRENCY), env=env)
        cert.wait_until("a provider call in flight", lambda: calls_in_flight(cert, run_id, sink))
        victim.kill()
        killed_at = time.monotonic()
        in_flight = dispatched_pending(cert, run_id)  # the daemon is dead: this is final
        sink.slow_ms = 0
        successor = cert.run_daemon_until_idle(record, f"q2-{scenario.provider}-2", env=env)
        status = cert.wait_for_runs([run_id])[run_id]
        recovery_s = time.monotonic() - killed_at
        received = keys_received(sink)
        delivery_ids = {key: d.id for key, d in sink.deliveries_by_key.items()} if isinstance(sink, WebhookSink) else {}
        resent = sink.duplicate_attempts if isinstance(sink, WebhookSink) else 0

    items = {item["id"]: item for item in cert.items(run_id)}
    reclaimed = cert.claims_by_worker([run_id]).get(successor.worker_id, 0)
    outcome = {
        "provider": scenario.provider,
        "run_id": run_id,
        "run_status": status,
        "items": len(items),
        "in_flight_at_kill": len(in_flight),
        "in_flight_item_ids": sorted(in_flight),
        "in_flight_final_statuses": dict(Counter(items[i]["status"] for i in in_flight)),
        "item_statuses": dict(Counter(item["status"] for item in items.values())),
        "max_provider_calls_per_key": max(received.values(), default=0),
        "resent_and_deduplicated_by_provider": resent,
        "recovery_s": round(recovery_s, 3),
    }
    where = f"{scenario.provider} run {run_id}"
    expect(in_flight, f"{where}: no item was in flight when the daemon was killed")
    expect(
        len(in_flight) <= Q2_CONCURRENCY,
        f"{where}: {len(in_flight)} items were in flight, more than the daemon's concurrency {Q2_CONCURRENCY}",
    )
    expect(reclaimed, f"{where}: the restarted daemon did not claim the killed daemon's job")
    expect(
        outcome["in_flight_final_statuses"] == {scenario.in_flight_ends: len(in_flight)},
        f"{where}: items in flight at the kill ended {outcome['in_flight_final_statuses']},"
        f" expected all {scenario.in_flight_ends}",
    )
    others = {i: item["status"] for i, item in items.items() if i not in in_flight and item["status"] != "sent"}
    expect(not others, f"{where}: items not in flight at the kill did not end sent: {others}")
    expect(
        outcome["max_provider_calls_per_key"] <= 1,
        f"{where}: the provider acted on a key more than once: {dict(received)}",
    )
    for item_id, key in in_flight.items():
        if key in delivery_ids:
            expect(
                items[item_id]["provider_message_id"] == delivery_ids[key],
                f"{where}: item {item_id} recorded {items[item_id]['provider_message_id']},"
                f" not the provider's first delivery {delivery_ids[key]}",
            )
    return outcome


def check_crash_recovery(cert: Certification, record: CheckRecord) -> None:
    record.measurements["scenarios"] = [crash_and_recover(cert, record, s) for s in CRASH_SCENARIOS]


# --- Q3 scheduler SLA ----------------------------------------------------------------------------

Q3_CAMPAIGNS = 6
Q3_CONTACTS = 4
Q3_BATCH = 2  # so Q3 queues Q3_CAMPAIGNS * Q3_CONTACTS / Q3_BATCH jobs
Q3_SPREAD_S = 3.0  # deploys are spread over this long


def job_latencies(cert: Certification, run_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Per job: seconds from creation to its first claim (audit trail) and to its end."""
    return cert.rows(
        "SELECT j.id::text, j.status,"
        " extract(EPOCH FROM c.first_claim - j.created_at)::float8 AS pickup_s,"
        " extract(EPOCH FROM j.completed_at - j.created_at)::float8 AS completion_s"
        " FROM {schema}.job_queue AS j"
        " CROSS JOIN LATERAL (SELECT min(e.occurred_at) AS first_claim FROM {schema}.job_events AS e"
        "   WHERE e.job_id = j.id AND e.to_status = 'processing') AS c"
        " WHERE j.run_id = ANY(%s::uuid[]) ORDER BY j.created_at, j.id",
        list(run_ids),
    )


def check_scheduler_sla(cert: Certification, record: CheckRecord) -> None:
    """Jobs queued over a few seconds while a daemon runs: each picked up and done within the SLA."""
    run_ids: list[str] = []
    with WebhookSink() as sink:
        daemon = cert.start_daemon(record, "q3", "--concurrency", "4")
        cert.wait_listening([daemon])
        for _ in range(Q3_CAMPAIGNS):
            campaign = cert.campaign(record, "email", "webhook", sink.provider_settings(), Q3_CONTACTS)
            run_ids.append(cert.deploy(record, campaign, batch_size=Q3_BATCH))
            time.sleep(Q3_SPREAD_S / Q3_CAMPAIGNS)
        statuses = cert.wait_for_runs(run_ids, timeout=SLA_SECONDS)
        daemon.stop()

    jobs = job_latencies(cert, run_ids)
    unfinished = [job["id"] for job in jobs if job["status"] != "completed"]
    pickup = [job["pickup_s"] for job in jobs if job["pickup_s"] is not None]
    completion = [job["completion_s"] for job in jobs if job["completion_s"] is not None]
    record.measurements = {
        "sla_s": SLA_SECONDS,
        "campaigns": len(run_ids),
        "jobs": len(jobs),
        "deploys_spread_over_s": Q3_SPREAD_S,
        "run_statuses": dict(Counter(statuses.values())),
        "pickup_s": spread(pickup) if pickup else None,
        "completion_s": spread(completion) if completion else None,
    }
    expect(not unfinished, f"jobs did not complete: {', '.join(unfinished)}")
    expect(len(pickup) == len(completion) == len(jobs), "some jobs were never claimed or never ended")
    expect(max(pickup) < SLA_SECONDS, f"slowest pick-up took {max(pickup):.1f} s (SLA {SLA_SECONDS:g} s)")
    expect(max(completion) < SLA_SECONDS, f"slowest job took {max(completion):.1f} s (SLA {SLA_SECONDS:g} s)")


# --- E1, V1: one real provider action ------------------------------------------------------------


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
            sql.SQL("UPDATE {}.contacts SET {} = %s WHERE workspace_id = %s").format(sql.Identifier(cert.schema), column),
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


def check_email(cert: Certification, record: CheckRecord) -> None:
    if cert.real_email:
        deliver_one(cert, record, "email", "smtp", cert.real_email.settings, to=cert.real_email.to)
        record.measurements["server"] = f"{cert.real_email.settings['host']}:{cert.real_email.settings['port']}"
        record.measurements["received"] = "accepted by the server: confirm receipt in the inbox by Message-ID"
        return
    with SmtpSink() as sink:
        record.measurements["server"] = f"local SMTP sink {sink.url}"
        item = deliver_one(cert, record, "email", "smtp", sink.provider_settings())
        messages = sink.messages
    received = [m for m in messages if m.message_id == item["provider_message_id"] and item["recipient"] in m.rcpt_tos]
    record.measurements["received"] = bool(received)
    expect(
        len(received) == 1 and len(messages) == 1,
        f"the SMTP server should hold one message {item['provider_message_id']} for {item['recipient']};"
        f" it holds {[(m.message_id, m.rcpt_tos) for m in messages]}",
    )


def check_voice(cert: Certification, record: CheckRecord) -> None:
    if cert.real_voice:
        settings = cert.real_voice.settings
        content = {**default_content("voice"), "from": settings["from"]}
        deliver_one(cert, record, "voice", "twilio", settings, to=cert.real_voice.to, content=content)
        record.measurements["api"] = settings.get("base_url", "https://api.twilio.com")
        record.measurements["received"] = "call created by the provider: see its call log for the call id"
        return
    with VoiceSink() as sink:
        record.measurements["api"] = f"local voice sink {sink.url}"
        item = deliver_one(cert, record, "voice", "twilio", sink.provider_settings(), env=sink_environment(sink))
        calls = sink.calls
    received = [c for c in calls if c.sid == item["provider_message_id"] and c.to == item["recipient"]]
    record.measurements["received"] = bool(received)
    expect(
        len(received) == 1 and len(calls) == 1,
        f"the voice API should have one call {item['provider_message_id']} to {item['recipient']};"
        f" it has {[(c.sid, c.to) for c in calls]}",
    )


# --- UX1 run details, UX2 retry ------------------------------------------------------------------

UX1_CONTACTS = 6  # every third unsubscribed: 4 sent, 2 skipped
UX1_BATCH = 3


def check_run_details(cert: Certification, record: CheckRecord) -> None:
    """A finished run as run_details and `kernel-driver runs show` present it."""
    with SmtpSink() as sink:
        campaign = cert.campaign(record, "email", "smtp", sink.provider_settings(), UX1_CONTACTS, unsubscribed_every=3)
        run_id = cert.deploy(record, campaign, batch_size=UX1_BATCH)
        cert.run_daemon_until_idle(record, "ux1")
        cert.wait_for_runs([run_id])

    details = cert.kernel.run_details(uuid.UUID(run_id), 100)
    job_ids = [job["id"] for job in details["jobs"]]
    counts = details["item_counts"]
    record.measurements = {"jobs": len(job_ids), "items": len(details["items"]), "item_counts": counts}
    expect(details["run"]["id"] == run_id, f"run_details({run_id}) describes run {details['run']['id']}")
    expect(len(job_ids) == UX1_CONTACTS // UX1_BATCH, f"run_details lists {len(job_ids)} jobs")
    expect(counts == {"sent": 4, "skipped": 2}, f"run_details counts items {counts}, expected 4 sent, 2 skipped")
    expect(
        {item["job_id"] for item in details["items"]} == set(job_ids) and len(details["items"]) == UX1_CONTACTS,
        "run_details items do not belong to its jobs",
    )

    shown = cert.run_cli("runs", "show", run_id, "--items", str(UX1_CONTACTS))
    wanted = [run_id, *job_ids, *(f"{status} {n}" for status, n in counts.items())]
    wanted += [item["provider_message_id"] for item in details["items"] if item["provider_message_id"]]
    missing = [text for text in wanted if text not in shown]
    record.measurements["runs_show_lines"] = len(shown.splitlines())
    expect(not missing, f"`kernel-driver runs show {run_id}` does not show {missing}")
    as_json = json.loads(cert.run_cli("runs", "show", run_id, "--json"))
    expect(
        as_json["run"]["id"] == run_id and as_json["item_counts"] == counts,
        "`runs show --json` disagrees with run_details",
    )


UX2_CONTACTS = 5
UX2_REJECTED = (2, 4)  # contact numbers whose mailbox the server refuses in the first run


def check_retry(cert: Certification, record: CheckRecord) -> None:
    """A run with refused recipients; its retry targets only them and completes."""
    with SmtpSink() as sink:
        campaign = cert.campaign(record, "email", "smtp", sink.provider_settings(), UX2_CONTACTS)
        rejected = {campaign.address(n, "email") for n in UX2_REJECTED}
        sink.reject_rcpt = rejected
        first = cert.deploy(record, campaign, batch_size=UX2_CONTACTS)
        cert.run_daemon_until_idle(record, "ux2-1")
        first_status = cert.wait_for_runs([first])[first]

        sink.reject_rcpt = False  # the provider problem is fixed
        retry = cert.retry(record, first)
        lineage = cert.rows(
            "SELECT retry_of_run_id::text, root_run_id::text, generation FROM {schema}.campaign_runs WHERE id = %s",
            retry,
        )[0]
        targeted = {row["email"] for row in cert.rows(
            "SELECT c.email FROM {schema}.job_queue AS j CROSS JOIN LATERAL unnest(j.contact_ids) AS t (contact_id)"
            " INNER JOIN {schema}.contacts AS c ON c.id = t.contact_id WHERE j.run_id = %s",
            retry,
        )}
        cert.run_daemon_until_idle(record, "ux2-2")
        retry_status = cert.wait_for_runs([retry])[retry]
        received = sink.count_by_recipient()
    try:
        cert.retry(record, retry)
        refused_again = False
    except NothingToRetry:
        refused_again = True

    record.measurements = {
        "first_run": {"id": first, "status": first_status},
        "retry_run": {"id": retry, "status": retry_status, **lineage},
        "targeted": sorted(targeted),
        "deliveries_per_recipient": dict(received),
        "second_retry_refused": refused_again,
    }
    expect(first_status == "partial", f"first run {first} ended {first_status}, expected partial")
    expect(
        lineage["retry_of_run_id"] == first and lineage["root_run_id"] == first and lineage["generation"] == 2,
        f"retry run {retry} is not linked to run {first}: {lineage}",
    )
    expect(targeted == rejected, f"the retry targets {sorted(targeted)}, expected only {sorted(rejected)}")
    expect(retry_status == "completed", f"retry run {retry} ended {retry_status}, expected completed")
    expect(
        len(received) == UX2_CONTACTS and set(received.values()) == {1},
        f"expected each of the {UX2_CONTACTS} recipients to get one message in all: {dict(received)}",
    )
    expect(refused_again, "retrying the completed retry run was not refused with KE010")


# --- running the checks --------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    run: Callable[[Certification, CheckRecord], None]


CHECKS = (
    Check("Q1", "idempotency: no duplicate outbox rows or provider calls", check_idempotency),
    Check("Q2", "crash recovery: nothing re-sent, every item terminal", check_crash_recovery),
    Check("Q3", "scheduler SLA: jobs picked up and done within 120 s", check_scheduler_sla),
    Check("E1", "e-mail received with provider_message_id stored", check_email),
    Check("V1", "voice call attempted with its call id stored", check_voice),
    Check("UX1", "run, jobs and outbox visible (run_details, runs show)", check_run_details),
    Check("UX2", "retry creates a linked run for the failed contacts", check_retry),
)
assert tuple(check.id for check in CHECKS) == CHECK_IDS, "kernel_driver/frozen.py lists the checks"


def run_check(cert: Certification, check: Check) -> CheckRecord:
    record = CheckRecord(check.id, check.title, started_at=utc_now())
    started = time.monotonic()
    try:
        check.run(cert, record)
        cert.expect_only_own_workers(record)
        record.status = "PASS"
    except CheckFailed as failure:
        record.reason = str(failure)
    except Exception as exc:  # a refusal or error on the way is a failed check; it says why
        record.reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    finally:
        cert.kill_daemons()
    record.ended_at = utc_now()
    record.duration_s = round(time.monotonic() - started, 3)
    cert.collect_ids(record)
    return record


def purge_sql(schema: str, tenant: str) -> str:
    """Statements that delete every row of one certification tenant (`tenant` is a uuid, or a
    psql variable such as :'tenant')."""
    literal = tenant if tenant.startswith(":") else f"'{uuid.UUID(tenant)}'"
    where = f"WHERE tenant_id = {literal}::uuid"
    # Children before parents; campaign_audience rows go with their campaigns (ON DELETE CASCADE).
    tables = ("channel_outbox", "job_events", "job_queue", "campaign_runs", "campaigns", "contacts")
    statements = [f"DELETE FROM {schema}.{table} {where};" for table in tables]
    statements += [
        f"DELETE FROM {schema}.rate_buckets WHERE workspace_id IN"
        f" (SELECT workspace_id FROM {schema}.provider_configs {where});",
        f"DELETE FROM {schema}.provider_configs {where};",
    ]
    return "\n".join(["BEGIN;", *statements, "COMMIT;"])


def git_revision(root: Path) -> dict[str, Any] | None:
    """The checkout's commit and whether it has uncommitted changes; None outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def database_facts(conn: psycopg.Connection, schema: str) -> dict[str, Any]:
    row = conn.execute("SELECT version(), current_setting('server_version_num')::int, current_user").fetchone()
    assert row is not None
    return {
        "postgres": {"version": row[0], "version_num": row[1]},
        "database": {
            "host": conn.info.host,
            "port": conn.info.port,
            "dbname": conn.info.dbname,
            "user": row[2],
            "schema": schema,
        },
    }


def certify_database(
    conn: psycopg.Connection,
    settings: Settings,
    checks: Sequence[Check],
    kernel_version: str,
    report: Callable[[CheckRecord], None] = lambda record: None,
    real_email: RealProvider | None = None,
    real_voice: RealProvider | None = None,
) -> dict[str, Any]:
    """Run `checks` in a fresh certification tenant; the evidence document."""
    started_at = utc_now()
    with tempfile.TemporaryDirectory(prefix="kernel-certify-") as workdir:
        cert = Certification(conn, settings, Path(workdir), real_email, real_voice)
        records = []
        for check in checks:
            records.append(run_check(cert, check))
            report(records[-1])
    failed = [record.id for record in records if record.status != "PASS"]
    return {
        "format": EVIDENCE_FORMAT,
        "tool": {"name": "kernel-driver", "version": __version__, "python": platform.python_version()},
        "kernel_version": kernel_version,
        **database_facts(conn, settings.schema),
        "host": socket.gethostname(),
        "tenant_id": str(cert.tenant_id),
        "source": git_revision(PROJECT_ROOT),
        "frozen_files": frozen_file_digests(),
        "providers": {
            "email": "real" if real_email else "local SMTP sink",
            "voice": "real" if real_voice else "local voice sink",
        },
        "started_at": started_at,
        "ended_at": utc_now(),
        "checks": [asdict(record) for record in records],
        "summary": {
            "selected": [record.id for record in records],
            "passed": [record.id for record in records if record.status == "PASS"],
            "failed": failed,
            "result": "FAIL" if failed else "PASS",
        },
        "purge_sql": purge_sql(settings.schema, str(cert.tenant_id)),
    }


# --- the command -----------------------------------------------------------------------------


def select_checks(only: str | None) -> list[Check]:
    """The checks named in `only` ("Q1,e1"), in the harness's order; all when None."""
    if only is None:
        return list(CHECKS)
    wanted = {name.strip().upper() for name in only.split(",") if name.strip()}
    unknown = sorted(wanted - set(CHECK_IDS))
    if unknown or not wanted:
        raise ValueError(f"unknown check {', '.join(unknown) or '(none given)'} in --only; known: {', '.join(CHECK_IDS)}")
    return [check for check in CHECKS if check.id in wanted]


def real_provider(
    adapter: str, settings_option: str, settings_json: str | None, to_option: str, to: str | None
) -> RealProvider | None:
    """Parse and validate --smtp-settings/--email-to (or the voice pair); None when neither is given."""
    if settings_json is None and to is None:
        return None
    if settings_json is None or to is None:
        raise ValueError(f"{settings_option} and {to_option} go together")
    try:
        settings = json.loads(settings_json)
    except ValueError as exc:
        raise ValueError(f"{settings_option} is not valid JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{settings_option} must be a JSON object")
    problems = load_adapter(adapter).validate_settings(settings)
    if adapter == "twilio" and not settings.get("from"):
        problems.append("twilio setting 'from' (the caller id) is required for certification")
    if problems:
        raise ValueError(f"{settings_option}: " + "; ".join(problems))
    return RealProvider(settings, to)


def report_line(record: CheckRecord) -> None:
    line = f"{record.status} {record.id:<3} {record.title} ({record.duration_s:.1f} s)"
    click.echo(line + (f": {record.reason}" if record.reason else ""))


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default="evidence.json", show_default=True,
              help="Where to write the evidence JSON.")
@click.option("--only", metavar="IDS", help=f"Comma-separated checks to run [default: all of {','.join(CHECK_IDS)}].")
@click.option("--smtp-settings", metavar="JSON", help="E1 through this SMTP server (smtp adapter settings).")
@click.option("--email-to", metavar="ADDRESS", help="E1's recipient when --smtp-settings is given.")
@click.option("--voice-settings", metavar="JSON", help="V1 through this Twilio-compatible API (twilio adapter settings).")
@click.option("--voice-to", metavar="NUMBER", help="V1's callee (E.164) when --voice-settings is given.")
@click.pass_obj
def certify(settings: Settings, out: Path, only: str | None, smtp_settings: str | None, email_to: str | None,
            voice_settings: str | None, voice_to: str | None) -> None:
    """Run the QA certification harness (Q1-Q3, E1, V1, UX1, UX2) and write the evidence JSON.

    Each check seeds its own rows in a fresh certification tenant and drives real daemons
    (scoped to that tenant) against local provider sinks, or the real providers given.
    Exit 0 when every selected check passed, 1 when one failed.
    """

    try:
        checks = select_checks(only)
        real_email = real_provider("smtp", "--smtp-settings", smtp_settings, "--email-to", email_to)
        real_voice = real_provider("twilio", "--voice-settings", voice_settings, "--voice-to", voice_to)
    except (ValueError, ProviderConfigError) as exc:
        raise BadUsage(str(exc)) from exc
    if not out.parent.is_dir():
        raise BadUsage(f"cannot write {out}: directory {out.parent} does not exist")

    with database(settings) as conn:
        kernel_version = migrate.kernel_version(conn, settings.schema)
        if kernel_version is None:
            raise DatabaseError(
                f"no kernel in schema {settings.schema}: run kernel-driver migrate first"
            )
        evidence = certify_database(conn, settings, checks, kernel_version, report_line, real_email, real_voice)

    partial = out.with_name(out.name + ".tmp")
    partial.write_text(json.dumps(evidence, indent=2) + "\n")
    partial.replace(out)
    summary = evidence["summary"]
    passed, selected = len(summary["passed"]), len(summary["selected"])
    click.echo(f"{summary['result']}: {passed} of {selected} checks passed; evidence in {out}")
    if summary["failed"]:
        click.get_current_context().exit(ExitCode.FAILED)
