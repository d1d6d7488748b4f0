"""The wrappers in kernel_driver.queries, against a real kernel: each calls the SQL function it
names, in each of its forms, and returns what the function returned, typed. Beside them, the
guards of issue 9 (one owner for every fact): every function the driver calls has a wrapper in
the kernel's catalog, every wrapper is exercised here, and no other module of the driver or of
the tests (tests/sql aside: it tests the SQL itself) calls a wrapped function in SQL."""

from __future__ import annotations

import inspect
import re
import tokenize
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest

from kernel_driver import queries
from kernel_driver.queries import ITEM_STATUSES, RUN_STATUSES, Kernel, LaunchCheck, QueueDepth, RunSummary, StepRequest
from kernel_driver.testing.seed import seed_campaign
from tests.sql.helpers import drain_run


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

    kernel.cancel_campaign_run(batched)
    start = datetime.now(UTC) + timedelta(days=1)
    scheduled = kernel.deploy_campaign(seeded.campaign_id, 2, start_at=start, priority=5,
                                       deadline=start + timedelta(hours=1))
    assert conn.execute("SELECT priority, start_at, deadline, (SELECT array_agg(DISTINCT status) FROM job_queue"
                        " WHERE run_id = r.id) FROM campaign_runs AS r WHERE id = %s", (scheduled,)).fetchone() == (
        5, start, start + timedelta(hours=1), ["scheduled"])

    latest = kernel.latest_runs(10)
    assert [r.id for r in latest] == [scheduled, batched, first]
    assert all(isinstance(r, RunSummary) and r.campaign == latest[0].campaign for r in latest)
    assert (latest[0].priority, latest[0].start_at, latest[0].scheduled_jobs) == (5, start, 2)
    assert kernel.run_details(first, 0)["run"]["id"] == str(first)
    # retry_campaign_run needs a finished run: tests/integration/test_runs_show.py and
    # test_daemon_failures.py retry through the wrapper.


def test_retry_both_forms_and_run_details_both_forms(conn, kernel_schema):
    kernel = Kernel(conn, kernel_schema)
    seeded = seed_campaign(conn, kernel_schema, contacts=3, provider="noop")
    first = kernel.deploy_campaign(seeded.campaign_id)
    outcomes = iter(["sent", "failed", "unknown"])
    drain_run(conn, first, lambda _item: next(outcomes))

    details = kernel.run_details(first)
    assert details["item_counts"] == {"sent": 1, "failed": 1, "unknown": 1}
    assert len(details["items"]) == 3 and len(kernel.run_details(first, 1)["items"]) == 1
    [failed] = kernel.run_items(first, "failed")
    assert failed["status"] == "failed" and failed["run_id"] == str(first)
    page = kernel.run_items(first, None, None, 2)
    assert len(page) == 2 and len(kernel.run_items(first, after=page[-1]["id"], limit=2)) == 1

    def targeted(run_id: UUID) -> int:
        return int(conn.execute(
            "SELECT sum(cardinality(contact_ids)) FROM job_queue WHERE run_id = %s", (run_id,)
        ).fetchone()[0])

    failed_only = kernel.retry_campaign_run(first)
    assert isinstance(failed_only, UUID) and targeted(failed_only) == 1
    kernel.cancel_campaign_run(failed_only)
    with_unknown = kernel.retry_campaign_run(first, include_unknown=True)
    assert targeted(with_unknown) == 2  # include_unknown reached the kernel
    kernel.cancel_campaign_run(with_unknown)
    assert targeted(kernel.retry_campaign_run(first, include_unknown=False)) == 1


def test_daemon_step_release_and_queue_stats(conn, kernel_schema):
    kernel = Kernel(conn, kernel_schema)
    seeded = seed_campaign(conn, kernel_schema, contacts=2, provider="noop")
    run_id = kernel.deploy_campaign(seeded.campaign_id)
    depth = kernel.queue_stats()
    assert all(isinstance(q, QueueDepth) for q in depth)
    assert [(q.status, q.jobs) for q in depth] == [("queued", 1)]

    rows = kernel.worker_step(StepRequest(worker="w1", lease_seconds=30, tenant_ids=None, claim=1))
    jobs = [row for row in rows if row.kind == "job"]
    assert [row.run_id for row in jobs] == [str(run_id)]  # ids come as text
    assert kernel.release_jobs("w1", [jobs[0].job_id], "test") == 1
    assert [(q.status, q.jobs) for q in kernel.queue_stats()] == [("queued", 1)]


def test_undispatch_gives_back_only_what_the_daemon_never_sent_of_jobs_it_holds(conn, kernel_schema):
    kernel = Kernel(conn, kernel_schema)
    seeded = seed_campaign(conn, kernel_schema, contacts=3, provider="noop")
    kernel.deploy_campaign(seeded.campaign_id)
    rows = kernel.worker_step(StepRequest(worker="w1", lease_seconds=30, tenant_ids=None, claim=1, want=3))
    (job_id,) = {row.job_id for row in rows if row.kind == "job"}
    items = [row.item_id for row in rows if row.kind == "item"]
    assert len(items) == 3  # all three marked dispatched; say the answer never came for two
    assert kernel.undispatch_items("w2", [job_id], []) == []  # fenced: w2 holds nothing
    back = kernel.undispatch_items("w1", [job_id], items[:1])
    assert sorted(row[2] for row in back) == sorted(items[1:]) and {row[0] for row in back} == {job_id}
    assert conn.execute("SELECT count(*) FILTER (WHERE dispatched_at IS NULL), sum(dispatch_count)"
                        " FROM channel_outbox WHERE job_id = %s", (job_id,)).fetchone() == (2, 1)
    assert kernel.undispatch_items("w1", [job_id], items[:1]) == []  # nothing dispatched is left

    # A job claimed by a step whose answer never came: the daemon does not know it holds it.
    other = seed_campaign(conn, kernel_schema, contacts=2, provider="noop")
    kernel.deploy_campaign(other.campaign_id)
    rows = kernel.worker_step(StepRequest(worker="w1", lease_seconds=30, tenant_ids=None, held=[job_id],
                                          claim=1, want=2))
    (stray,) = {row.job_id for row in rows if row.kind == "job"}
    assert kernel.undispatch_items("w1", [job_id], items[:1]) == []  # its items are not the daemon's to send
    released = conn.execute("SELECT status, locked_by FROM job_queue WHERE id = %s", (stray,)).fetchone()
    assert released == ("queued", None)
    assert conn.execute("SELECT count(*) FROM channel_outbox WHERE job_id = %s AND dispatched_at IS NOT NULL",
                        (stray,)).fetchone()[0] == 0  # sent by whoever claims it next, not ended unknown


# The functions an application or an operator may execute that the driver does not call, each
# with why. Every other one, and the daemon's worker_step and release_jobs, must be called by a
# Kernel wrapper in every one of its forms.
NOT_CALLED = {
    "complete_job": "the operator's manual end of a stuck job, from psql (the daemon ends jobs in worker_step)",
    "current_tenant": "an RLS predicate",
    "current_workspace": "an RLS predicate",
    "in_scope": "an RLS predicate",
    "scope": "an application scopes its own transactions; the driver passes the tenant as an argument",
    "kernel_version": "kernel_driver.migrate reads it, where no kernel may be installed yet",
    "provider_settings_problems": "the launch checks run it (provider_settings_valid)",
    "_setting_problem": "provider_settings_problems calls it as its caller, so its callers may execute it",
    "clock": "the time schedules are judged by, read in SQL (a session may move it: tests)",
    "is_time_zone": "the time zone constraint of contacts and workspaces",
    "send_window_opens": "deploys and worker_step compute windows with it; an application may ask it",
    "distribution_violations": "a DBA's catalog report before distributing by tenant, from psql (docs/scale-out.md)",
    "reference_tables": "which tables a DBA makes Citus reference tables, from psql (docs/scale-out.md)",
}
DAEMON_CALLS = {"worker_step", "release_jobs", "undispatch_items"}


def wrapped_calls() -> set[tuple[str, int]]:
    """(function, argument count) of every kernel call in kernel_driver/queries.py's statements."""
    source = inspect.getsource(queries)
    return {
        (name, len(arguments.split(",")) if arguments.strip() else 0)
        for name, arguments in re.findall(r"\{schema\}\.(\w+)\(([^)]*)\)", source)
    }


def test_every_function_the_driver_calls_has_a_wrapper(conn, kernel_schema):
    granted = conn.execute(
        "SELECT p.proname, p.pronargs FROM pg_proc AS p WHERE p.pronamespace = %s::regnamespace"
        " AND (has_function_privilege(%s, p.oid, 'EXECUTE') OR has_function_privilege(%s, p.oid, 'EXECUTE')"
        "      OR p.proname = ANY(%s))",
        (kernel_schema, f"{kernel_schema}_app", f"{kernel_schema}_operator", list(DAEMON_CALLS)),
    ).fetchall()
    assert {name for name, _ in granted} >= set(NOT_CALLED), "NOT_CALLED names a function the kernel lacks"
    expected = {(name, nargs) for name, nargs in granted if name not in NOT_CALLED}
    # A function (or a form of one) without a wrapper; a wrapper naming no function of the kernel.
    assert expected - wrapped_calls() == set()
    assert wrapped_calls() - expected == set()


def test_every_wrapper_is_exercised_here():
    """Each public Kernel method is called by a test of this module (a new one must be)."""
    methods = {name for name, _ in inspect.getmembers(Kernel, inspect.isfunction) if not name.startswith("_")}
    source = Path(__file__).read_text()
    assert {name for name in methods if f"kernel.{name}(" not in source} == set()


CHECKOUT = Path(__file__).resolve().parents[2]
# Where a call of a wrapped function in SQL may stand besides queries.py: tests/sql tests the
# SQL itself; test_migrate's is text the schema rewrite is tested on, not a call.
RAW_CALLS_ALLOWED = {"kernel_driver/queries.py", "tests/migrations/test_migrate.py"}


def raw_calls(path: Path) -> list[str]:
    """Every string literal of `path` that calls a function Kernel wraps: `SELECT [schema.]f(`,
    `FROM [schema.]f(` or a schema placeholder's `{schema}.f(` / `{}.f(`."""
    names = "|".join(sorted({name for name, _ in wrapped_calls()}))
    call = re.compile(rf"(?:\b(?:SELECT|FROM)\s+(?:\w+\.)?|\{{\w*\}}\.)({names})\s*\(")
    with path.open("rb") as source:
        return [
            f"{path.relative_to(CHECKOUT)}:{token.start[0]}: {found.group(1)}"
            for token in tokenize.tokenize(source.readline)
            if token.type == tokenize.STRING and (found := call.search(token.string))
        ]


@pytest.mark.parametrize("tree", ["kernel_driver", "tests/integration", "tests/crash", "tests/pooler",
                                  "tests/migrations", "tests/unit"])
def test_only_queries_calls_the_wrapped_functions(tree):
    paths = sorted(p for p in (CHECKOUT / tree).rglob("*.py")
                   if str(p.relative_to(CHECKOUT)) not in RAW_CALLS_ALLOWED)
    assert paths
    assert [call for path in paths for call in raw_calls(path)] == []


def test_the_run_statuses_are_the_kernels(conn, kernel_schema):
    """`runs list --status` offers RUN_STATUSES: exactly what campaign_runs_status_check allows."""
    definition = conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'campaign_runs_status_check'"
        " AND conrelid = %s::regclass", (f"{kernel_schema}.campaign_runs",)).fetchone()[0]
    assert set(re.findall(r"'(\w+)'::text", definition)) == set(RUN_STATUSES)
    definition = conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'channel_outbox_status_check'"
        " AND conrelid = %s::regclass", (f"{kernel_schema}.channel_outbox",)).fetchone()[0]
    assert set(re.findall(r"'(\w+)'::text", definition)) == set(ITEM_STATUSES)
