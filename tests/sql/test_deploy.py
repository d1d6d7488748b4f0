"""deploy_campaign: the run, its batch jobs, the run_config snapshot, NOTIFY, one active run."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest

from tests.sql.helpers import (
    CONTENT,
    SETTINGS,
    add_contacts,
    deploy,
    in_threads,
    jobs_of,
    raises,
    refused,
    rows,
    run_row,
    scalar,
    seed_campaign,
)


def test_deploy_creates_a_queued_run_with_batch_jobs_covering_the_audience_once(conn):
    seed = seed_campaign(conn, 2500)
    run_id = deploy(conn, seed.campaign_id)
    run = run_row(conn, run_id)
    assert run["status"] == "queued"
    assert (run["campaign_id"], run["tenant_id"], run["workspace_id"], run["channel"]) == (
        seed.campaign_id, seed.tenant_id, seed.workspace_id, "email",
    )
    assert run["root_run_id"] == run_id and run["retry_of_run_id"] is None and run["generation"] == 1
    assert run["started_at"] is None and run["completed_at"] is None
    jobs = jobs_of(conn, run_id)
    assert [len(j["contact_ids"]) for j in jobs] == [1000, 1000, 500]
    assert {j["status"] for j in jobs} == {"queued"}
    assert {j["attempts"] for j in jobs} == {0}
    assert {(j["tenant_id"], j["workspace_id"]) for j in jobs} == {(seed.tenant_id, seed.workspace_id)}
    assert [j["payload"] for j in jobs] == [{"batch_no": n, "batch_count": 3} for n in (1, 2, 3)]
    covered = [c for j in jobs for c in j["contact_ids"]]
    assert sorted(covered) == seed.contact_ids  # each contact exactly once


@pytest.mark.parametrize(("contacts", "batch", "sizes"), [(20, 7, [7, 7, 6]), (5, 5, [5]), (3, 1, [1, 1, 1])])
def test_batch_size_is_respected(conn, contacts, batch, sizes):
    seed = seed_campaign(conn, contacts)
    jobs = jobs_of(conn, deploy(conn, seed.campaign_id, batch))
    assert [len(j["contact_ids"]) for j in jobs] == sizes
    assert sorted(c for j in jobs for c in j["contact_ids"]) == seed.contact_ids


def test_unsubscribed_contacts_are_part_of_the_snapshot(conn):
    # They become skipped items at reserve time: the job's share is the whole audience.
    seed = seed_campaign(conn, 4, unsubscribed_every=2)
    jobs = jobs_of(conn, deploy(conn, seed.campaign_id))
    assert sorted(jobs[0]["contact_ids"]) == seed.contact_ids


def test_run_config_snapshots_content_and_provider(conn):
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    config = run_row(conn, run_id)["run_config"]
    assert config["content"] == CONTENT["email"]
    assert config["provider"] == "smtp"
    assert config["provider_settings"] == SETTINGS["smtp"]
    assert config["batch_size"] == 1000
    # Later edits do not reach the run.
    conn.execute("UPDATE campaigns SET content = '{\"subject\": \"new\", \"text\": \"new\"}' WHERE id = %s",
                 [seed.campaign_id])
    conn.execute("UPDATE provider_configs SET settings = '{}' WHERE workspace_id = %s", [seed.workspace_id])
    assert run_row(conn, run_id)["run_config"] == config


def test_contacts_added_after_deploy_are_not_in_the_run(conn):
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    late = add_contacts(conn, seed.campaign_id, 1)
    covered = {c for j in jobs_of(conn, run_id) for c in j["contact_ids"]}
    assert covered == set(seed.contact_ids) and not covered & set(late)


def test_deploy_is_audited(conn):
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    events = rows(conn, "SELECT entity, from_status, to_status FROM job_events WHERE run_id = %s", [run_id])
    assert events == [{"entity": "run", "from_status": None, "to_status": "queued"}]


def test_deploy_notifies_kernel_jobs(conn, connect):
    listener = connect()
    listener.execute("LISTEN kernel_jobs")
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    received = list(listener.notifies(timeout=5, stop_after=1))
    assert [(n.channel, n.payload) for n in received] == [("kernel_jobs", str(run_id))]


def test_refused_deploy_does_not_notify(conn, connect):
    listener = connect()
    listener.execute("LISTEN kernel_jobs")
    seed = seed_campaign(conn, 2, provider=None)
    with raises("KE001"):
        deploy(conn, seed.campaign_id)
    assert list(listener.notifies(timeout=0.3)) == []


def test_second_deploy_while_active_is_refused(conn):
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    with refused(conn, "KE003", seed.campaign_id, run_id):
        deploy(conn, seed.campaign_id)
    conn.execute("UPDATE campaign_runs SET status = 'running' WHERE id = %s", [run_id])
    with refused(conn, "KE003", seed.campaign_id, run_id):
        deploy(conn, seed.campaign_id)


def test_deploy_after_the_run_ended_creates_a_new_root_run(conn):
    seed = seed_campaign(conn, 2)
    first = deploy(conn, seed.campaign_id)
    conn.execute("SELECT cancel_campaign_run(%s)", [first])
    second = deploy(conn, seed.campaign_id)
    assert second != first
    assert run_row(conn, second)["root_run_id"] == second


def test_deploy_waits_for_a_concurrent_deploy_and_then_refuses(conn, connect):
    seed = seed_campaign(conn, 2)
    first = connect(autocommit=False)
    run_id = deploy(first, seed.campaign_id)  # transaction open: holds the campaign lock
    outcome = {}

    def second():
        try:
            outcome["run"] = deploy(connect(), seed.campaign_id)
        except psycopg.Error as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive(), "the second deploy did not wait for the first"
    first.commit()
    thread.join(10)
    assert outcome["error"].diag.sqlstate == "KE003"
    assert str(run_id) in outcome["error"].diag.message_primary
    assert scalar(conn, "SELECT count(*) FROM campaign_runs") == 1


def test_concurrent_deploys_create_exactly_one_run(conn, connect):
    seed = seed_campaign(conn, 50)
    sessions = [connect() for _ in range(4)]
    outcomes = in_threads(len(sessions), lambda i: deploy(sessions[i], seed.campaign_id, 10))
    runs = [o for o in outcomes if isinstance(o, uuid.UUID)]
    errors = [o for o in outcomes if not isinstance(o, uuid.UUID)]
    assert len(runs) == 1
    assert [e.diag.sqlstate for e in errors] == ["KE003"] * 3
    assert scalar(conn, "SELECT count(*) FROM campaign_runs") == 1
    assert scalar(conn, "SELECT count(*) FROM job_queue") == 5
