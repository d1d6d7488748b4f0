"""The ``kernel-driver`` command line: a thin click group; the work happens in the modules it calls.

Every user mistake ends with one line ``error: …`` on stderr and a stable exit code (README,
"Exit codes"); a traceback means a bug in the driver.
"""

from __future__ import annotations

import importlib
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import psycopg

from kernel_driver import migrate as migrator
from kernel_driver.compatibility import KernelMismatch, require_kernel
from kernel_driver.config import DEFAULT_SCHEMA, Settings
from kernel_driver.db import DatabaseUnreachable, KernelError, connection_lost, database, require_dsn
from kernel_driver.errors import (
    BadUsage,
    CommandError,
    DatabaseError,
    DatabaseUnreachableError,
    KernelRefusedError,
    MigrationRefusedError,
)

# Which exception means which exit code; the first match wins (subclasses before bases).
EXIT_CODES: list[tuple[type[BaseException], type[CommandError]]] = [
    (migrator.MigrationRefused, MigrationRefusedError),
    (KernelMismatch, DatabaseError),
    (DatabaseUnreachable, DatabaseUnreachableError),
    (KernelError, KernelRefusedError),
    (migrator.MigrationFailed, DatabaseError),
    (psycopg.Error, DatabaseError),
]


# Options of the group that may also be written after the subcommand, as the docs do:
# `kernel-driver run --dsn …` is `kernel-driver --dsn … run`.
GROUP_OPTIONS = ("--dsn", "--schema")


def hoist_group_options(args: list[str]) -> list[str]:
    """Move --dsn/--schema (and their values) in front of the subcommand; nothing after `--`."""
    front: list[str] = []
    rest: list[str] = []
    position = 0
    while position < len(args):
        arg = args[position]
        if arg == "--":
            rest.extend(args[position:])
            break
        if arg.split("=", 1)[0] in GROUP_OPTIONS:
            taken = 1 if "=" in arg else 2
            front.extend(args[position:position + taken])
            position += taken
        else:
            rest.append(arg)
            position += 1
    return front + rest


# Commands defined in their own modules, imported only when one is called (click's "lazily
# loading subcommands"): `run` starts without the certification harness, the demo, the sinks
# or aiosmtpd (tests/unit/test_cli_imports.py).
LAZY_COMMANDS = {
    "campaigns": "kernel_driver.campaigns",
    "certify": "kernel_driver.certify",
    "deploy": "kernel_driver.campaigns",
    "demo": "kernel_driver.demo",
    "freeze": "kernel_driver.freeze",
    "runs": "kernel_driver.runs",
    "ui": "kernel_driver.console",
}
# The extra whose libraries a lazy command needs, when it is not the testing extra.
EXTRAS = {"ui": "ui"}


def needs_extra(name: str, missing: ModuleNotFoundError) -> click.Command:
    """Stands in for a command whose libraries come with an extra (certify and demo: testing;
    ui: ui)."""
    extra = EXTRAS.get(name, "testing")
    message = (f"kernel-driver {name} needs {missing.name}, which comes with the {extra} extra:"
               f" pip install 'kernel-driver[{extra}]'")

    def refuse(**_: Any) -> None:
        raise BadUsage(message)

    return click.Command(name, callback=refuse, help=message, short_help=f"(needs kernel-driver[{extra}])",
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


class KernelGroup(click.Group):
    """Turns the driver's exceptions into ``error:`` lines for every subcommand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            try:
                command = getattr(importlib.import_module(LAZY_COMMANDS[cmd_name]), cmd_name)
            except ModuleNotFoundError as exc:
                return needs_extra(cmd_name, exc)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_group_options(args))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except psycopg.errors.InsufficientPrivilege as exc:
            raise DatabaseError(missing_role(exc, ctx.obj.schema if isinstance(ctx.obj, Settings) else DEFAULT_SCHEMA)
                                ) from exc
        except Exception as exc:
            if connection_lost(exc):
                raise DatabaseUnreachableError(lost_connection(exc)) from exc
            for exc_type, error in EXIT_CODES:
                if isinstance(exc, exc_type):
                    raise error(" ".join(str(exc).split())) from exc
            raise


def lost_connection(exc: Exception) -> str:
    """What a command whose connection died under it (a server restart, a failover) is told."""
    reason = " ".join(str(exc).split())
    return (f"lost the connection to the database while the command ran ({reason}): a change it made is"
            " committed whole or not at all; once the database is back, run it again (before a deploy or"
            " runs retry, see with kernel-driver runs list whether its run was made)")


def missing_role(exc: psycopg.Error, schema: str) -> str:
    """What a login without the kernel role a command needs is told (not the SQL it ran)."""
    return (f"{exc.diag.message_primary}: this database login lacks the kernel role the command needs;"
            f" GRANT {schema}_worker (run), {schema}_app (deploy, retry, cancel), {schema}_reader (runs, campaigns"
            f" check) or {schema}_operator TO it; migrate needs the kernel's owner or a superuser")


@click.group(cls=KernelGroup)
@click.option(
    "--dsn",
    envvar="KERNEL_DSN",
    metavar="DSN",
    help="libpq connection string or postgresql:// URI [env: KERNEL_DSN].",
)
@click.option(
    "--schema",
    envvar="KERNEL_SCHEMA",
    default=DEFAULT_SCHEMA,
    show_default=True,
    help="Schema the kernel lives in; its roles are SCHEMA_owner, _worker, _app, _reader "
    "[env: KERNEL_SCHEMA].",
)
@click.version_option(package_name="kernel-driver")
@click.pass_context
def main(ctx: click.Context, dsn: str | None, schema: str) -> None:
    """Postgres-native campaign execution kernel: install it, run it, certify it.

    --dsn and --schema may also follow the command: `kernel-driver migrate --dsn …`.
    """
    try:
        ctx.obj = Settings(dsn=dsn, schema=schema)
    except ValueError as exc:
        raise BadUsage(str(exc)) from exc


@main.command()
@click.option("--dry-run", is_flag=True, help="Show what would be applied; write nothing.")
@click.option("--status", "show_status", is_flag=True, help="List every migration and its state.")
@click.option(
    "--sql-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Use the migrations in SQL_DIR/migrations instead of the installed ones.",
)
@click.pass_obj
def migrate(settings: Settings, dry_run: bool, show_status: bool, sql_dir: Path | None) -> None:
    """Install or upgrade the kernel in the database (one transaction per migration).

    Refuses, changing nothing, when a migration that is already applied differs from its file.
    """
    files = migrator.load_migrations(sql_dir)
    schema = settings.schema
    with database(settings) as conn:
        if show_status:
            print_status(conn, schema, files)
            return
        if dry_run:
            todo = migrator.plan(conn, schema, files)
            for migration in todo.adopt:
                click.echo(f"would record sha256 of {migration.name} (applied without the driver)")
            for migration in todo.pending:
                click.echo(f"would apply {migration.name}")
            if not todo.adopt and not todo.pending:
                click.echo(f"nothing to do: schema {schema} is up to date")
            return
        started = time.monotonic()
        for action, migration in migrator.migrate(conn, schema, files):
            elapsed_ms = (time.monotonic() - started) * 1000
            if action == "adopted":
                click.echo(f"recorded sha256 of {migration.name} (applied without the driver)")
            elif action == "applied":
                click.echo(f"applied {migration.name} ({elapsed_ms:.0f} ms)")
            else:
                click.echo(f"skipped {migration.name} (applied meanwhile by another migrator)")
            started = time.monotonic()
        version = migrator.kernel_version(conn, schema)
        click.echo(f"schema {schema} is at {files[-1].name}, kernel_version {version}")


def print_status(
    conn: psycopg.Connection, schema: str, files: Sequence[migrator.Migration]
) -> None:
    entries, version = migrator.status(conn, schema, files)
    for entry in entries:
        applied = entry.applied_at.isoformat(timespec="seconds") if entry.applied_at else "-"
        click.echo(f"{entry.version:04d}  {entry.name:<32} {applied:<25} {entry.state}")
    click.echo(f"kernel_version: {version or 'not installed'} (schema {schema})")


@main.command()
@click.option("--worker-id", envvar="KERNEL_WORKER_ID", help="Unique id of this daemon [default: host:pid].")
@click.option("--concurrency", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Provider calls in flight at once (also the most items that can end unknown after a crash).")
@click.option("--tenant", "tenant_ids", type=click.UUID, multiple=True, envvar="KERNEL_TENANT_ID",
              help="Claim only this tenant's jobs; repeat it for several tenants, taken in turns"
                   " (passed with every call: safe behind a pooler).")
@click.option("--until-idle", is_flag=True, help="Exit 0 once no queued or processing job is left.")
@click.option("--poll-interval", type=click.FloatRange(0.05, 3600), default=2.0, show_default=True,
              help="Seconds between looks for work when no NOTIFY arrives.")
@click.option("--lease-seconds", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
              help="Job lease; the daemon renews it while it works.")
@click.option("--grace-seconds", type=click.FloatRange(0, 3600), default=10.0, show_default=True,
              help="On SIGTERM/SIGINT, how long in-flight provider calls may finish.")
@click.option("--listen-dsn", envvar="KERNEL_LISTEN_DSN",
              help="Direct (unpooled) connection for LISTEN wake-ups [default: the --dsn].")
@click.option("--no-listen", is_flag=True,
              help="Poll only (a transaction-mode pooler cannot deliver NOTIFY and no direct DSN is given).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve Prometheus metrics on 127.0.0.1:PORT.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO",
              show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one object per line, with job_id, run_id, attempt, run_status as keys.")
@click.pass_obj
def run(settings: Settings, worker_id: str | None, concurrency: int, tenant_ids: tuple[uuid.UUID, ...],
        until_idle: bool, poll_interval: float, lease_seconds: float, grace_seconds: float,
        listen_dsn: str | None, no_listen: bool, metrics_port: int | None, log_level: str,
        log_format: str) -> None:
    """Run the daemon: claim jobs, send their items through the providers, record every outcome.

    SIGTERM or SIGINT: stop claiming, finish in-flight calls within the grace period, release the
    jobs for another daemon, exit 0.
    """
    from kernel_driver import logs
    from kernel_driver.worker import Worker, WorkerConfig, stop_on_signals

    logs.configure(log_level, log_format)
    with database(settings) as conn:
        require_kernel(conn, settings.schema)
    worker = Worker(WorkerConfig(
        dsn=require_dsn(settings), schema=settings.schema, worker_id=worker_id or settings.worker_id,
        concurrency=concurrency, poll_interval=poll_interval, lease_seconds=lease_seconds,
        grace_seconds=grace_seconds, until_idle=until_idle, metrics_port=metrics_port,
        tenant_ids=tenant_ids or None, listen_dsn=listen_dsn, listen=not no_listen,
    ))
    with stop_on_signals(worker.request_stop):
        worker.run()
