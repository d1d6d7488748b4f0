"""The daemon needs nothing but the worker role: no table access, no superuser."""

from __future__ import annotations

from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from tests.integration.daemon import client_dsn, item_counts, login_role, run_status, run_until_idle, start_daemon


def test_daemon_runs_as_a_login_with_only_the_worker_role(conn, db_dsn, kernel_schema):
    with login_role(conn, kernel_schema, "worker") as login:
        seeded = seed_campaign(conn, kernel_schema, contacts=50, provider="noop", unsubscribed_every=10)
        run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id)
        run_until_idle(client_dsn(db_dsn, user=login), kernel_schema)
        assert item_counts(conn, [run_id]) == {"sent": 45, "skipped": 5}
        assert run_status(conn, run_id) == "completed"


def test_daemon_without_a_kernel_says_to_migrate(empty_db_dsn):
    daemon = start_daemon(empty_db_dsn, None, "--until-idle")
    output = daemon.wait(timeout=60)
    assert daemon.returncode == 6
    assert output.strip().splitlines()[-1] == (
        "error: no kernel in schema kernel: run kernel-driver migrate first "
        "(or pass the --schema it was installed into)"
    )
