"""`make soak DURATION=…` (issue 12, item 1): campaigns deployed continuously across three
tenants while faults are injected at random, with the invariants checked while it runs and at
the end. Everything is real: a PostgreSQL cluster of its own (embedded, so it can be crashed),
two `kernel-driver run` processes, an SMTP server and HTTP receivers for voice and webhooks.

Faults: a daemon SIGKILLed (and started again), a daemon SIGSTOPped past its lease and resumed,
the server restarted in immediate mode, the daemons' connections terminated, the cluster's disk
full for a few seconds (when run as root: the cluster lives on a tmpfs of its own), receivers
answering 500, timing out, resetting mid-reply, refusing connections or answering slowly, the
SMTP server failing temporarily. Campaigns: e-mail, voice and webhook, some with a priority,
some starting a few seconds later, some with a send window.

Invariants, while running and at the end: nobody receives an e-mail or a call twice, and a
webhook key is processed once; at the end every item, job and run is terminal, every run has
one item per contact, the kernel's item counts equal the items, and an item ends `unknown` only
if it was out (dispatched, its outcome not recorded) while a fault of its kind lasted. The
report (JSON) says how many faults of each kind were survived and how much was delivered.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import psycopg

from kernel_driver import migrate
from kernel_driver.queries import Kernel
from kernel_driver.testing.postgres import connected, embedded_postgres, restart_immediately, start_if_stopped
from kernel_driver.testing.seed import seed_campaign
from kernel_driver.testing.sinks import SmtpSink, VoiceSink, WebhookSink
from tests.integration.daemon import Daemon, start_daemon

SCHEMA = "kernel"
LEASE_S = 3
DAEMON_ARGS = ("--concurrency", "8", "--lease-seconds", str(LEASE_S), "--poll-interval", "0.2",
               "--grace-seconds", "2", "--log-level", "WARNING")
TERMINAL_RUNS = ("completed", "partial", "failed", "cancelled")
# Faults that can lose a daemon with items out, and faults of a provider's answers.
DAEMON_FAULTS = ("sigkill", "sigstop", "restart", "terminate", "disk full")
RECEIVER_FAULTS = ("receiver", "smtp")
DISK_CAP = "16g"  # the tmpfs' size when not full: a cap, it holds only what the cluster writes


class FillableDisk:
    """The cluster's own file system, a tmpfs, so that it can be made full for a while."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ballast = path / "ballast"

    def used_kib(self) -> int:
        stat = os.statvfs(self.path)
        return (stat.f_blocks - stat.f_bfree) * stat.f_frsize // 1024

    def remount(self, size: str) -> bool:
        return subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)],
                              capture_output=True).returncode == 0

    def fill(self) -> None:
        """Shrink it to what is used (the server writes meanwhile: try again), then take the rest."""
        if not any(self.remount(f"{self.used_kib() + 64}k") for _ in range(50)):
            raise RuntimeError(f"could not shrink {self.path} to what it holds: a ballast would take all {DISK_CAP}")
        with self.ballast.open("wb") as ballast:
            try:
                while True:
                    ballast.write(bytes(65536))
                    ballast.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)
        if not self.remount(DISK_CAP):
            raise RuntimeError(f"could not grow {self.path} back to {DISK_CAP}")


@contextmanager
def fillable_disk(path: Path) -> Iterator[tuple[FillableDisk | None, str]]:
    """A tmpfs at `path` for the cluster, or None (and why) where mounting is not allowed."""
    path.mkdir()
    if os.geteuid() != 0:
        yield None, "not injected: mounting the cluster's tmpfs needs root"
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_CAP},mode=1777", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        yield None, f"not injected: mount said {mounted.stderr.strip()}"
        return
    try:
        yield FillableDisk(path), "injected"
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


@dataclass
class Soak:
    dsn: str
    smtp: SmtpSink
    voice: VoiceSink
    webhook: WebhookSink
    rng: random.Random
    disk: FillableDisk | None
    tenants: list[uuid.UUID] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)
    runs: dict[Any, dict[str, Any]] = field(default_factory=dict)  # run id -> channel, contacts
    faults: Counter[str] = field(default_factory=Counter)
    # (kind, start, end) of every fault, on the clock the database stamps items with (one host)
    intervals: list[tuple[str, datetime, datetime]] = field(default_factory=list)
    checks: int = 0

    def connect(self) -> psycopg.Connection:
        return connected(self.dsn, timeout=60)

    # --- work ------------------------------------------------------------------------------

    def deploy_one(self) -> None:
        channel = self.rng.choice(["email", "email", "voice", "webhook"])
        provider, settings = {
            "email": ("smtp", self.smtp.provider_settings()),
            "voice": ("twilio", self.voice.provider_settings()),
            "webhook": ("webhook", self.webhook.provider_settings()),
        }[channel]
        tenant = self.rng.choice(self.tenants)
        contacts = self.rng.randint(5, 60)
        with self.connect() as conn:
            seeded = seed_campaign(conn, SCHEMA, contacts=contacts, channel="voice" if channel == "voice" else "email",
                                   provider=provider, settings=settings, tenant_id=tenant, name=f"soak {channel}")
            if self.rng.random() < 0.2:  # a send window open now, in UTC
                now = datetime.now(UTC)
                conn.execute("UPDATE campaigns SET send_window_start = %s, send_window_end = %s WHERE id = %s",
                             ((now - timedelta(hours=1)).time(), (now + timedelta(hours=2)).time(),
                              seeded.campaign_id))
            start = datetime.now(UTC) + timedelta(seconds=3) if self.rng.random() < 0.2 else None
            priority = self.rng.choice([None, None, 10, -5])
            run_id = Kernel(conn, SCHEMA).deploy_campaign(seeded.campaign_id, self.rng.choice([None, 10, 25]),
                                                          start_at=start, priority=priority)
        self.runs[run_id] = {"channel": channel, "contacts": contacts, "reachable": seeded.reachable}

    def start_daemons(self) -> None:
        self.daemons = [d for d in self.daemons if d.poll() is None]
        while len(self.daemons) < 2:
            self.daemons.append(start_daemon(self.dsn, SCHEMA, *DAEMON_ARGS,
                                             env={"VOICE_SINK_AUTH_TOKEN": self.voice.auth_token}))

    # --- faults ----------------------------------------------------------------------------

    def fault(self) -> None:
        """One fault, and when it lasted: an item may end unknown only if it was in flight
        (dispatched, its outcome not recorded) while a fault lasted."""
        kind = self.rng.choice(["sigkill", "sigstop", "restart", "terminate", "receivers", "smtp",
                                *(["disk"] if self.disk else [])])
        started = datetime.now(UTC)
        name = self.inject(kind)
        self.faults[name] += 1
        self.intervals.append((name, started, datetime.now(UTC)))

    def inject(self, kind: str) -> str:
        """Cause the fault; its name in the report."""
        if kind == "sigkill":
            self.rng.choice(self.daemons).kill()
            self.start_daemons()
        elif kind == "sigstop":
            daemon = self.rng.choice(self.daemons)
            daemon.send_signal(signal.SIGSTOP)
            time.sleep(LEASE_S + 1)
            daemon.send_signal(signal.SIGCONT)
        elif kind == "restart":
            restart_immediately(self.dsn)
        elif kind == "disk" and self.disk:
            self.disk.fill()  # writes fail (53100); a WAL write that fails is a PANIC: a crash
            self.prove_disk_full()
            time.sleep(self.rng.uniform(1, 2 * LEASE_S))
            self.disk.free()
            start_if_stopped(self.dsn)  # its crash recovery may have failed on the full disk
            return "disk full"
        elif kind == "terminate":
            with self.connect() as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                             " AND backend_type = 'client backend'")
        elif kind == "receivers":
            sink = self.rng.choice([self.voice, self.webhook])
            how = self.rng.choice(["500", "timeout", "reset", "refuse", "slow"])
            if how == "500":
                sink.force_status = 500
            elif how == "timeout":
                sink.timeout_first_n = 2
            elif how == "reset":
                sink.reset_first_n = 2
            elif how == "refuse":
                sink.refuse()
            else:
                sink.slow_ms = 800
            time.sleep(2)
            sink.force_status, sink.timeout_first_n, sink.reset_first_n, sink.slow_ms = None, 0, 0, 0
            if how == "refuse":
                sink.start()
            return f"receiver {how}"
        else:
            self.smtp.temp_fail = True
            time.sleep(2)
            self.smtp.temp_fail = False
            return "smtp temporary failure"
        return kind

    def prove_disk_full(self) -> None:
        """The fault is real: a write of 20 MB (a temporary table, past its buffers) fails."""
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute("CREATE TEMP TABLE ballast AS SELECT repeat('x', 1000) FROM generate_series(1, 20000)")
        except psycopg.OperationalError:
            return  # refused (53100), or the server is down: it crashed on a failed write
        raise RuntimeError("the cluster's disk was made full, yet a 20 MB write succeeded")

    # --- invariants --------------------------------------------------------------------------

    def duplicates(self) -> dict[str, int]:
        """Deliveries twice to one contact of one run. Recipients are unique per campaign (each
        has a workspace of its own); calls carry the item's idempotency key; the webhook sink
        processes a key once, and a key names its lineage, contact and generation."""
        emails = Counter(rcpt for message in self.smtp.messages for rcpt in message.rcpt_tos)
        calls = Counter(call.idempotency_token for call in self.voice.calls)
        hooks = Counter(key.rsplit(":", 1)[0] for key in self.webhook.deliveries_by_key)
        return {"e-mails received twice": sum(1 for n in emails.values() if n > 1),
                "calls made twice": sum(1 for n in calls.values() if n > 1),
                "webhook contacts processed twice": sum(1 for n in hooks.values() if n > 1)}

    def check_while_running(self) -> dict[str, int]:
        self.checks += 1
        return {name: n for name, n in self.duplicates().items() if n}

    def check_at_the_end(self) -> dict[str, Any]:
        with self.connect() as conn:
            pending = conn.execute("SELECT count(*) FROM channel_outbox WHERE status = 'pending'").fetchone()[0]
            open_jobs = conn.execute("SELECT count(*) FROM job_queue WHERE status NOT IN"
                                     " ('completed', 'failed', 'cancelled')").fetchone()[0]
            open_runs = conn.execute("SELECT count(*) FROM campaign_runs WHERE status <> ALL (%s)",
                                     [list(TERMINAL_RUNS)]).fetchone()[0]
            items = dict(conn.execute("SELECT run_id, count(*) FROM channel_outbox GROUP BY run_id").fetchall())
            statuses = dict(conn.execute("SELECT status, count(*) FROM channel_outbox GROUP BY status").fetchall())
            # Two ways to end unknown: the daemon was lost after dispatching (a kill, a pause
            # past the lease, a crash of the server it outlasted), or the provider's answer
            # said nothing certain or never came (a receiver fault). Either way a fault of
            # that kind must have lasted while the item was out: from its dispatch to its end.
            unknown = conn.execute("SELECT error LIKE 'worker lost%', dispatched_at, completed_at"
                                   " FROM channel_outbox WHERE status = 'unknown'").fetchall()
            unknown_why = dict(conn.execute("SELECT provider || ': ' || coalesce(error, '?'), count(*)"
                                            " FROM channel_outbox WHERE status = 'unknown' GROUP BY 1").fetchall())
            wrong_counts = conn.execute(
                "SELECT count(*) FROM job_item_counts AS c FULL JOIN (SELECT job_id, status, count(*) AS items"
                " FROM channel_outbox GROUP BY 1, 2) AS o USING (job_id, status)"
                " WHERE coalesce(c.items, 0) <> coalesce(o.items, 0)").fetchone()[0]
        short = {run: info["contacts"] - items.get(run, 0) for run, info in self.runs.items()
                 if items.get(run, 0) != info["contacts"]}
        problems = {
            "items not terminal": pending, "jobs not terminal": open_jobs, "runs not terminal": open_runs,
            "runs without one item per contact": len(short), "job counts not equal to the items": wrong_counts,
            "unknown items out while no fault of their kind lasted": sum(
                1 for lost, dispatched, ended in unknown if not self.explained(lost, dispatched, ended)),
            **self.duplicates(),
        }
        return {"problems": problems, "items": statuses, "unknown": len(unknown), "unknown_why": unknown_why}

    def explained(self, lost: bool, dispatched: datetime | None, ended: datetime | None) -> bool:
        kinds = DAEMON_FAULTS if lost else RECEIVER_FAULTS
        return dispatched is not None and ended is not None and any(
            kind.startswith(kinds) and start <= ended and dispatched <= end for kind, start, end in self.intervals)


def wait_until_done(soak: Soak, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        soak.start_daemons()
        with soak.connect() as conn:
            open_runs = conn.execute("SELECT count(*) FROM campaign_runs WHERE status <> ALL (%s)",
                                     [list(TERMINAL_RUNS)]).fetchone()[0]
        if open_runs == 0:
            return
        time.sleep(0.5)


@click.command()
@click.option("--duration", type=click.FloatRange(10), default=120, show_default=True, help="Seconds of faults.")
@click.option("--seed", type=int, help="Random seed (printed, to run the same soak again).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write the report JSON here.")
def main(duration: float, seed: int | None, report: Path | None) -> None:
    seed = seed if seed is not None else random.randrange(2**31)
    click.echo(f"soak: {duration:.0f} s of faults, seed {seed}")
    started = time.monotonic()
    with (tempfile.TemporaryDirectory(prefix="soak-") as scratch,
          fillable_disk(Path(scratch) / "disk") as (disk, disk_full),
          embedded_postgres(Path(scratch) / "disk" / "pg") as dsn,
          SmtpSink() as smtp, VoiceSink() as voice, WebhookSink() as webhook):
        click.echo(f"soak: disk full {disk_full}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            list(migrate.migrate(conn, SCHEMA, migrate.load_migrations()))
        soak = Soak(dsn, smtp, voice, webhook, random.Random(seed), disk)
        soak.tenants = [uuid.UUID(int=soak.rng.getrandbits(128)) for _ in range(3)]
        soak.start_daemons()
        next_fault = time.monotonic() + soak.rng.uniform(2, 5)
        while time.monotonic() - started < duration:
            soak.deploy_one()
            if time.monotonic() >= next_fault:
                soak.fault()
                soak.start_daemons()
                next_fault = time.monotonic() + soak.rng.uniform(2, 6)
            if broken := soak.check_while_running():
                click.echo(f"soak: stopping early, an invariant broke: {broken}", err=True)
                break
            time.sleep(soak.rng.uniform(0.1, 0.6))
        wait_until_done(soak, timeout=300)
        result = soak.check_at_the_end()
        for daemon in soak.daemons:
            daemon.stop()
        delivered = {"e-mails": len(smtp.messages), "calls": len(voice.calls),
                     "webhooks": len(webhook.deliveries_by_key)}
    summary = {"seed": seed, "duration_s": round(time.monotonic() - started, 1), "campaigns": len(soak.runs),
               "faults": dict(soak.faults), "disk_full": disk_full, "delivered": delivered,
               "checks_while_running": soak.checks, **result}
    click.echo(json.dumps(summary, indent=2, default=str))
    if report:
        report.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    failed = {name: n for name, n in result["problems"].items() if n}
    if failed:
        click.echo(f"soak FAILED: {failed}", err=True)
        sys.exit(1)
    click.echo(f"soak passed: {sum(soak.faults.values())} faults survived, {sum(delivered.values())} delivered")


if __name__ == "__main__":
    main()
