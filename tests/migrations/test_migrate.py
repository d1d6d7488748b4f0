"""kernel-driver migrate against real databases: idempotent, concurrent-safe, checksummed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from kernel_driver import db, freeze, migrate, scaffold, schema_dump
from tests.migrations.conftest import Bench

PROBE = "CREATE TABLE kernel.probe (id integer PRIMARY KEY);\n"


def test_second_run_changes_nothing(bench: Bench) -> None:
    first = bench.migrate()
    assert first.exit_code == 0, first.stderr
    files = bench.files()
    assert [f"applied {m.name}" in first.stdout for m in files] == [True] * len(files)
    applied = bench.ledger()
    assert {v: r.sha256 for v, r in applied.items()} == {m.version: m.sha256 for m in files}
    with db.connect(bench.dsn) as conn:
        before = schema_dump.dump(conn, bench.schema)

    second = bench.migrate()

    assert second.exit_code == 0, second.stderr
    assert "applied" not in second.stdout
    assert f"schema {bench.schema} is at {files[-1].name}" in second.stdout
    assert bench.ledger() == applied
    with db.connect(bench.dsn) as conn:
        assert schema_dump.dump(conn, bench.schema) == before


def test_concurrent_migrators_apply_each_migration_once(bench: Bench) -> None:
    """Both plan while nothing is applied, then apply at once: the advisory lock queues the
    second, which finds the ledger row and skips instead of failing or applying twice."""
    files = bench.files()
    both_planned = threading.Barrier(2, timeout=30)
    outcomes: list[list[bool]] = []
    errors: list[Exception] = []

    def migrator() -> None:
        try:
            with db.connect(bench.dsn, autocommit=True) as conn:
                pending = migrate.plan(conn, bench.schema, files).pending
                both_planned.wait()
                outcomes.append([migrate.apply(conn, bench.schema, m) for m in pending])
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=migrator) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    # Each migration is applied by exactly one of them (which one may differ per file: the
    # lock is taken per migration, so the two can take turns).
    assert len(outcomes) == 2
    assert [sorted(pair) for pair in zip(*outcomes, strict=True)] == [[False, True]] * len(files)
    assert sorted(bench.ledger()) == [m.version for m in files]


def test_two_migrate_processes_both_succeed(bench: Bench) -> None:
    command = [
        str(Path(sys.executable).with_name("kernel-driver")),
        *("--dsn", bench.dsn, "--schema", bench.schema, "migrate", "--sql-dir", str(bench.sql)),
    ]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in processes]

    assert [p.returncode for p in processes] == [0, 0], results
    stdout = "".join(out for out, _ in results)
    files = bench.files()
    assert [stdout.count(f"applied {m.name} ") for m in files] == [1] * len(files)
    assert sorted(bench.ledger()) == [m.version for m in files]


def test_changed_applied_file_is_refused(bench: Bench) -> None:
    assert bench.migrate().exit_code == 0
    recorded = bench.ledger()[1].sha256
    first = bench.edit_first()
    changed = bench.files()[0].sha256
    bench.add("probe", PROBE)

    result = bench.migrate()

    assert result.exit_code == 3
    assert result.stdout == ""
    message = result.stderr
    assert message.startswith("error: ") and message.count("\n") == 1
    assert f"{first.stem}.sql was changed after it was applied" in message
    assert f"sha256 {recorded}" in message and f"sha256 {changed}" in message
    assert "the kernel is frozen: put the change in a new migration" in message
    # Refused before applying anything, the valid new migration included.
    assert len(bench.ledger()) == len(bench.files()) - 1
    assert not bench.exists("probe")


def test_appended_migration_is_applied(bench: Bench) -> None:
    assert bench.migrate().exit_code == 0
    name = bench.add("probe", PROBE)

    result = bench.migrate()

    assert result.exit_code == 0, result.stderr
    assert [line.split(" (")[0] for line in result.stdout.splitlines()[:-1]] == [f"applied {name}"]
    assert bench.exists("probe")  # written for schema kernel, installed in the session's
    latest = bench.files()[-1]
    assert bench.ledger()[latest.version].sha256 == latest.sha256
    assert [line.split()[-1] for line in bench.migrate("--status").stdout.splitlines()[:-1]] == [
        "ok"
    ] * len(bench.files())


def test_ledger_entry_without_file_is_refused(bench: Bench) -> None:
    name = bench.add("probe", PROBE)
    assert bench.migrate().exit_code == 0
    (bench.sql / "migrations" / f"{name}.sql").unlink()

    result = bench.migrate()

    assert result.exit_code == 3
    assert f"the database has migration {name}" in result.stderr
    assert "no such file" in result.stderr


def test_renamed_applied_file_is_refused(bench: Bench) -> None:
    name = bench.add("probe", PROBE)
    assert bench.migrate().exit_code == 0
    renamed = name.replace("probe", "renamed")
    (bench.sql / "migrations" / f"{name}.sql").rename(bench.sql / "migrations" / f"{renamed}.sql")

    result = bench.migrate()

    assert result.exit_code == 3
    assert f"was applied as {name}.sql but its file is now {renamed}.sql" in result.stderr


def test_migration_that_does_not_record_itself_is_rolled_back(bench: Bench) -> None:
    assert bench.migrate().exit_code == 0
    name = bench.add("probe", PROBE, record=False)

    result = bench.migrate()

    assert result.exit_code == 3
    assert f"{name}.sql did not record itself" in result.stderr
    assert not bench.exists("probe")
    assert len(bench.ledger()) == len(bench.files()) - 1


def test_failing_migration_is_rolled_back(bench: Bench) -> None:
    assert bench.migrate().exit_code == 0
    name = bench.add("broken", PROBE + "SELECT 1 / 0;\n")

    result = bench.migrate()

    assert result.exit_code == 6
    assert result.stderr == (
        f"error: {name}.sql failed and was rolled back: division by zero (SQLSTATE 22012)\n"
    )
    assert not bench.exists("probe")


def test_migration_refused_by_the_kernel_exits_5(bench: Bench) -> None:
    """An upgrade may check a precondition and refuse with a KE code, e.g. while runs are active."""
    assert bench.migrate().exit_code == 0
    refusal = "DO $$ BEGIN RAISE EXCEPTION 'runs are active: 2' USING ERRCODE = 'KE011'; END $$;"
    bench.add("guarded", refusal)

    result = bench.migrate()

    assert (result.exit_code, result.stderr) == (5, "error: runs are active: 2\n")


def test_dry_run_writes_nothing(bench: Bench) -> None:
    result = bench.migrate("--dry-run")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [f"would apply {m.name}" for m in bench.files()]
    assert not bench.exists("schema_migrations")

    assert bench.migrate().exit_code == 0
    before = bench.ledger()
    name = bench.add("probe", PROBE)
    result = bench.migrate("--dry-run")
    assert result.stdout.splitlines() == [f"would apply {name}"]
    assert bench.ledger() == before
    assert not bench.exists("probe")

    (bench.sql / "migrations" / f"{name}.sql").unlink()
    result = bench.migrate("--dry-run")
    assert result.stdout == f"nothing to do: schema {bench.schema} is up to date\n"


def test_status_shows_each_migration_and_the_kernel_version(bench: Bench) -> None:
    files = bench.files()
    before = bench.migrate("--status").stdout.splitlines()
    assert [line.split() for line in before] == [
        *([f"{m.version:04d}", m.name, "-", "pending"] for m in files),
        ["kernel_version:", "not", "installed", "(schema", f"{bench.schema})"],
    ]

    assert bench.migrate().exit_code == 0
    with db.connect(bench.dsn) as conn:
        version = migrate.kernel_version(conn, bench.schema)
    assert version
    after = bench.migrate("--status").stdout.splitlines()
    assert [line.split()[-1] for line in after[:-1]] == ["ok"] * len(files)
    assert after[-1] == f"kernel_version: {version} (schema {bench.schema})"

    bench.edit_first()
    tampered = bench.migrate("--status")
    assert tampered.exit_code == 0
    assert tampered.stdout.splitlines()[0].split()[-1] == "mismatch"


@pytest.mark.skipif(shutil.which("psql") is None, reason="needs the psql client")
def test_install_with_psql_is_adopted_without_reapplying(
    cli: Callable[..., Result], cluster: Any, sql_dir: Path
) -> None:
    """The DBA path: the files as they are, in order, each in one transaction, into the literal
    schema kernel. The driver then records their sha256 and applies nothing again."""
    roles = migrate.schema_roles("kernel")
    with db.connect(cluster.server_dsn, autocommit=True) as admin:
        existed = admin.execute(
            "SELECT array_agg(rolname) FROM pg_roles WHERE rolname = ANY(%s)", [roles]
        ).fetchone()[0] or []
        try:
            with cluster.database() as dsn:
                for path in sorted((sql_dir / "migrations").glob("*.sql")):
                    subprocess.run(
                        ["psql", "-X", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-f", str(path), "-d", dsn],
                        check=True,
                        capture_output=True,
                    )
                files = migrate.load_migrations(sql_dir)
                with db.connect(dsn) as conn:
                    installed = migrate.read_ledger(conn, "kernel")
                assert [(r.name, r.sha256) for r in installed.values()] == [(m.name, None) for m in files]
                adopting = [f"sha256 of {m.name} (applied without the driver)" for m in files]

                dry = cli("--dsn", dsn, "migrate", "--sql-dir", str(sql_dir), "--dry-run")
                assert dry.stdout.splitlines() == [f"would record {line}" for line in adopting]
                result = cli("--dsn", dsn, "migrate", "--sql-dir", str(sql_dir))

                assert result.exit_code == 0, result.stderr
                assert result.stdout.splitlines()[:-1] == [f"recorded {line}" for line in adopting]
                with db.connect(dsn) as conn:
                    adopted = migrate.read_ledger(conn, "kernel")
                assert {v: r.sha256 for v, r in adopted.items()} == {m.version: m.sha256 for m in files}
                assert {v: r.applied_at for v, r in adopted.items()} == {
                    v: r.applied_at for v, r in installed.items()
                }
        finally:  # after the database is gone
            db.drop_roles(admin, [r for r in roles if r not in existed])


def test_another_schema_name_rewrites_identifiers_and_leaves_prose_alone() -> None:
    text = (
        "CREATE SCHEMA kernel AUTHORIZATION kernel_owner;\n"
        "GRANT USAGE ON SCHEMA kernel TO kernel_worker, kernel_operator;\n"
        "SELECT kernel.deploy_campaign(x), kernel.\"odd\", kernel_version(), execution_kernel.tenant_id;\n"
        "COMMENT ON TABLE kernel.schema_migrations IS 'Ledger of applied kernel migrations; filled in by"
        " kernel-driver migrate. The kernel.';\n"
    )
    assert migrate.rename_schema(text, "acme") == (
        "CREATE SCHEMA acme AUTHORIZATION acme_owner;\n"
        "GRANT USAGE ON SCHEMA acme TO acme_worker, acme_operator;\n"
        "SELECT acme.deploy_campaign(x), acme.\"odd\", kernel_version(), execution_kernel.tenant_id;\n"
        "COMMENT ON TABLE acme.schema_migrations IS 'Ledger of applied kernel migrations; filled in by"
        " kernel-driver migrate. The kernel.';\n"
    )


def test_an_installed_kernel_under_another_name_keeps_its_prose(conn, kernel_schema: str) -> None:
    # every test database is installed under a kt_… schema name
    comment = conn.execute("SELECT obj_description(%s::regclass, 'pg_class')",
                           [f"{kernel_schema}.schema_migrations"]).fetchone()[0]
    assert "kernel-driver migrate" in comment and "applied kernel migrations" in comment
    hint = conn.execute(
        "SELECT prosrc FROM pg_proc WHERE proname = 'deploy_campaign' AND pronargs = 5"
        " AND pronamespace = %s::regnamespace", [kernel_schema]).fetchone()[0]
    assert f"SELECT * FROM {kernel_schema}.check_campaign_launch_prerequisites" in hint


def test_a_scaffolded_migration_applies_and_bumps_the_version(bench: Bench) -> None:
    current = freeze.migrations_version(bench.sql / "migrations")
    major, minor, _ = freeze.version_key(current)
    following = f"{major}.{minor + 1}.0"
    path = scaffold.scaffold(bench.sql, "next_change", following)
    assert path.name == f"{len(bench.files()):04d}_next_change.sql"

    result = bench.migrate()

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-1].endswith(f"kernel_version {following}")
    assert freeze.migrations_version(bench.sql / "migrations") == following
    with pytest.raises(SystemExit, match="does not go up"):
        scaffold.scaffold(bench.sql, "again", following)
    with pytest.raises(SystemExit, match="not a migration slug"):
        scaffold.scaffold(bench.sql, "Bad-Name", f"{major}.{minor + 2}.0")
