"""The evidence document: the frozen files' digests, the database and host facts, the records."""

from __future__ import annotations

import hashlib
import platform
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg

from kernel_driver import __version__, freeze
from kernel_driver.certify.harness import Certification, RealProvider
from kernel_driver.certify.records import CheckRecord, utc_now
from kernel_driver.certify.suite import Check, run_check
from kernel_driver.config import Settings

EVIDENCE_FORMAT = "kernel-driver/certification-evidence/1"
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages)




def frozen_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """The frozen kernel's files present under `root`, relative to it (the list is the freeze
    gate's, kernel_driver.freeze). Changing any of them needs a new certification."""
    return [path for path in freeze.frozen_files(root) if (root / path).is_file()]


def frozen_file_digests(root: Path = PROJECT_ROOT) -> list[dict[str, str]]:
    return [
        {"path": path.as_posix(), "sha256": hashlib.sha256((root / path).read_bytes()).hexdigest()}
        for path in frozen_files(root)
    ]




def purge_sql(schema: str, tenants: Sequence[str]) -> str:
    """Statements that delete every row of the certification tenants (each a uuid, or a psql
    variable such as :'tenant')."""
    literals = [tenant if tenant.startswith(":") else f"'{uuid.UUID(tenant)}'" for tenant in tenants]
    where = f"WHERE tenant_id IN ({', '.join(f'{literal}::uuid' for literal in literals)})"
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
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, check=True
        )
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
        "load_tenant_id": str(cert.load_tenant_id),
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
        "purge_sql": purge_sql(settings.schema, [str(cert.tenant_id), str(cert.load_tenant_id)]),
    }
