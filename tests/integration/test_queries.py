"""The application's and the operator's wrappers in kernel_driver.queries, against a real kernel:
each calls the SQL function it names and returns what the function returned, typed."""

from __future__ import annotations

from uuid import UUID

from kernel_driver.queries import Kernel, LaunchCheck, RunSummary
from kernel_driver.testing.seed import seed_campaign


def test_deploy_check_cancel_retry_and_list(conn, kernel_schema):
    kernel = Kernel(conn, kernel_schema)
    seeded = seed_campaign(conn, kernel_schema, contacts=3, provider="noop")

    checks = kernel.launch_checks(seeded.campaign_id, seeded.workspace_id)
    assert checks and all(isinstance(c, LaunchCheck) for c in checks)
    assert all(c.passed for c in checks), checks

    first = kernel.deploy_campaign(seeded.campaign_id)
    kernel.cancel_campaign_run(first)  # a campaign has one active run at a time
    assert conn.execute("SELECT status FROM campaign_runs WHERE id = %s", (first,)).fetchone()[0] == "cancelled"
    batched = kernel.deploy_campaign(seeded.campaign_id, 1)
    assert isinstance(first, UUID) and isinstance(batched, UUID)
    jobs = dict(conn.execute(
        "SELECT run_id, count(*) FROM job_queue WHERE run_id = ANY(%s) GROUP BY run_id", ([first, batched],)
    ).fetchall())
    assert jobs == {first: 1, batched: 3}  # the batch size reached the kernel

    latest = kernel.latest_runs(10)
    assert [r.id for r in latest] == [batched, first]
    assert all(isinstance(r, RunSummary) and r.campaign == latest[0].campaign for r in latest)
    assert kernel.run_details(first, 0)["run"]["id"] == str(first)
    # retry_campaign_run needs a finished run: tests/integration/test_runs_show.py and
    # test_daemon_failures.py retry through the wrapper.
