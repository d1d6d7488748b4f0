"""Upgrading to 1.7, which keys the host tables with tenant_id (docs/runbook.md, "Upgrade 1.6 → 1.7").

An application's own foreign key to contacts (id) cannot survive the new key: the migration must
name it and change nothing. Once it is re-pointed, the upgrade keeps every audience row and gives
each its campaign's tenant."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import psycopg

from kernel_driver import db
from tests.migrations.conftest import Bench

LAST = "0008_kernel_1_7.sql"


def at_1_6(bench: Bench, tmp_path: Path) -> Path:
    """The bench migrated to 1.6; returns where 1.7's file and every later one wait."""
    aside = tmp_path / "later"
    aside.mkdir()
    for migration in sorted((bench.sql / "migrations").glob("*.sql")):
        if migration.name >= LAST:
            shutil.move(migration, aside / migration.name)
    assert bench.migrate().exit_code == 0
    return aside


def put_back(bench: Bench, aside: Path) -> None:
    for migration in aside.iterdir():
        shutil.move(migration, bench.sql / "migrations" / migration.name)


def connect(bench: Bench) -> psycopg.Connection:
    conn = db.connect(bench.dsn, autocommit=True)
    conn.execute("SELECT set_config('search_path', %s, false)", [f"{bench.schema},public"])
    return conn


def seed_1_6(conn: psycopg.Connection) -> dict[str, uuid.UUID]:
    """A campaign with two contacts in its audience, inserted as a 1.6 application does."""
    ids = {name: uuid.uuid4() for name in ("tenant", "workspace", "campaign", "c1", "c2")}
    conn.execute("INSERT INTO campaigns (id, tenant_id, workspace_id, name, channel) VALUES (%s, %s, %s, 'c', 'email')",
                 [ids["campaign"], ids["tenant"], ids["workspace"]])
    for contact in ("c1", "c2"):
        conn.execute("INSERT INTO contacts (id, tenant_id, workspace_id, email) VALUES (%s, %s, %s, 'a@b.c')",
                     [ids[contact], ids["tenant"], ids["workspace"]])
        conn.execute("INSERT INTO campaign_audience VALUES (%s, %s)", [ids["campaign"], ids[contact]])
    return ids


def test_an_applications_foreign_key_to_contacts_id_is_named_and_nothing_changes(bench: Bench, tmp_path: Path):
    aside = at_1_6(bench, tmp_path)
    with connect(bench) as conn:
        seed_1_6(conn)
        conn.execute(f"CREATE TABLE public.app_orders_{bench.schema} (id int PRIMARY KEY,"
                     f" contact_id uuid CONSTRAINT app_orders_contact REFERENCES {bench.schema}.contacts (id))")
    try:
        put_back(bench, aside)
        refused = bench.migrate()
        assert refused.exit_code == 5, refused.stderr
        assert f"app_orders_contact on public.app_orders_{bench.schema};" in refused.stderr
        assert "point the key at (id, tenant_id), then migrate again" in refused.stderr
        assert max(bench.ledger()) == 7
        with connect(bench) as conn:
            assert conn.execute("SELECT kernel_version()").fetchone() == ("1.6.0",)
            columns = conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = 'campaign_audience'::regclass"
                                   " AND attname = 'tenant_id'").fetchone()
            assert columns == (0,)

            # Re-pointed as the runbook says, the upgrade goes through.
            conn.execute(f"ALTER TABLE public.app_orders_{bench.schema} DROP CONSTRAINT app_orders_contact")
        assert bench.migrate().exit_code == 0
        assert 8 in bench.ledger()
    finally:
        with connect(bench) as conn:
            conn.execute(f"DROP TABLE IF EXISTS public.app_orders_{bench.schema}")


def test_the_upgrade_gives_every_audience_row_its_campaigns_tenant(bench: Bench, tmp_path: Path):
    aside = at_1_6(bench, tmp_path)
    with connect(bench) as conn:
        ids = seed_1_6(conn)
    put_back(bench, aside)
    assert bench.migrate().exit_code == 0
    with connect(bench) as conn:
        audience = conn.execute("SELECT contact_id, tenant_id FROM campaign_audience ORDER BY contact_id").fetchall()
        assert sorted(audience) == sorted([(ids["c1"], ids["tenant"]), (ids["c2"], ids["tenant"])])
        assert conn.execute("SELECT * FROM distribution_violations()").fetchall() == []
        # A 1.6 application's insert keeps working: the trigger fills the tenant from the campaign.
        third = uuid.uuid4()
        conn.execute("INSERT INTO contacts (id, tenant_id, workspace_id, email) VALUES (%s, %s, %s, 'x@y.z')",
                     [third, ids["tenant"], ids["workspace"]])
        conn.execute("INSERT INTO campaign_audience VALUES (%s, %s)", [ids["campaign"], third])
        assert conn.execute("SELECT tenant_id FROM campaign_audience WHERE contact_id = %s",
                            [third]).fetchone() == (ids["tenant"],)
