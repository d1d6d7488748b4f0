"""The web console through Flask's test client, on a real database: who sees what (row-level
security through the request's role and scope), the pages' data, retry, cancel, the launch
checklist and deploy, keyset pages, and an error page for every bad request."""

from __future__ import annotations

import re
import uuid

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from kernel_driver.config import Settings
from kernel_driver.console.app import COOKIE, MAX_REQUEST_BYTES, Console, create_app
from kernel_driver.console.auth import Access, Tokens
from kernel_driver.console.data import PAGE
from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from tests.console.conftest import ADMIN_TOKEN, TENANT_A_TOKEN, TENANT_B_TOKEN
from tests.sql.helpers import drain_run


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def page(client, url, token=TENANT_A_TOKEN, status=200):
    response = client.get(url, headers=bearer(token))
    assert response.status_code == status, (url, response.status_code, response.text[:2000])
    return response.text


def csrf_of(html):
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)


def post(client, url, data=None, token=TENANT_A_TOKEN, csrf_from="/"):
    form = {"csrf": csrf_of(page(client, csrf_from, token)), **(data or {})}
    return client.post(url, data=form, headers=bearer(token))


def no_traceback(html):
    assert "Traceback" not in html and 'File "' not in html


# --- signing in ---------------------------------------------------------------------------


def test_every_page_needs_a_token(client, world):
    for url in ("/", f"/runs/{world.partly_failed_run}", "/campaigns", "/certification"):
        response = client.get(url)
        assert response.status_code == 302 and response.headers["Location"].startswith("/login?next=")
    forged = client.get("/", headers=bearer("forged-token-0123456789"))
    assert forged.status_code == 401 and "Unauthorized" in forged.text
    no_traceback(forged.text)
    assert client.post("/runs/x/cancel").status_code == 401


def test_login_sets_a_strict_http_only_cookie_and_redirects_only_here(client):
    refused = client.post("/login", data={"token": "not-a-known-token-at-all"})
    assert refused.status_code == 401 and "not one this console was started with" in refused.text
    response = client.get("/login?token=" + TENANT_A_TOKEN + "&next=/campaigns")
    assert response.status_code == 302 and response.headers["Location"] == "/campaigns"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get("/campaigns").status_code == 200  # the cookie signs in from now on
    for elsewhere in ("//evil.example/", "https://evil.example/"):
        assert client.get(f"/login?token={TENANT_A_TOKEN}&next={elsewhere}").headers["Location"] == "/"


def test_a_form_without_this_consoles_csrf_value_is_refused(client, world):
    url = f"/runs/{world.queued_run}/cancel"
    for form in ({}, {"csrf": "0" * 64}):
        response = client.post(url, data=form, headers=bearer(TENANT_A_TOKEN))
        assert response.status_code == 403 and "reload the page" in response.text
    # Another token's value does not do either.
    b_value = csrf_of(page(client, "/", TENANT_B_TOKEN))
    response = client.post(url, data={"csrf": b_value}, headers=bearer(TENANT_A_TOKEN))
    assert response.status_code == 403


# --- tenants ------------------------------------------------------------------------------


def test_a_tenant_sees_its_own_runs_and_campaigns_only(client, world):
    a_runs = page(client, "/")
    assert str(world.partly_failed_run) in a_runs and str(world.queued_run) in a_runs
    assert str(world.other_run) not in a_runs and "tenant b news" not in a_runs
    # Asking for the other tenant by name changes nothing: the filter is an admin's.
    assert str(world.other_run) not in page(client, f"/?tenant={world.tenant_b}")
    campaigns = page(client, "/campaigns")
    assert "autumn sale" in campaigns and "tenant b news" not in campaigns
    b_runs = page(client, "/", TENANT_B_TOKEN)
    assert str(world.other_run) in b_runs and str(world.partly_failed_run) not in b_runs


def test_another_tenants_ids_in_urls_are_not_found(client, world, conn):
    for url in (f"/runs/{world.partly_failed_run}", f"/runs/{world.partly_failed_run}?fragment=summary",
                f"/runs/{world.partly_failed_run}/retry", f"/runs/{world.queued_run}/cancel",
                f"/campaigns/{world.ready_campaign.campaign_id}"):
        html = page(client, url, TENANT_B_TOKEN, status=404)
        assert "not found" in html and "spring sale" not in html
    for url in (f"/runs/{world.queued_run}/cancel", f"/runs/{world.partly_failed_run}/retry",
                f"/campaigns/{world.ready_campaign.campaign_id}/deploy"):
        response = post(client, url, token=TENANT_B_TOKEN)
        assert response.status_code == 404, (url, response.text)
    # Nothing changed for tenant A.
    assert conn.execute("SELECT count(*) FROM campaign_runs WHERE tenant_id = %s", (world.tenant_a,)).fetchone()[0] == 2
    assert conn.execute("SELECT status FROM campaign_runs WHERE id = %s", (world.queued_run,)).fetchone()[0] == "queued"


def test_the_admin_sees_every_tenant_and_can_filter_by_one(client, world):
    everyone = page(client, "/", ADMIN_TOKEN)
    assert str(world.other_run) in everyone and str(world.partly_failed_run) in everyone
    only_b = page(client, f"/?tenant={world.tenant_b}", ADMIN_TOKEN)
    assert str(world.other_run) in only_b and str(world.partly_failed_run) not in only_b
    assert "tenant b news" in page(client, f"/runs/{world.other_run}", ADMIN_TOKEN)


def test_certification_is_for_admins(client):
    assert "for platform admins" in page(client, "/certification", TENANT_A_TOKEN, status=403)
    assert post(client, "/certification", {"check_UX1": "on"}).status_code == 403
    assert page(client, "/certification/evidence.json", TENANT_A_TOKEN, status=403)
    assert "No certification has run" in page(client, "/certification", ADMIN_TOKEN)
    assert "run the certification first" in page(client, "/certification/evidence.json", ADMIN_TOKEN, status=404)


# --- the runs list and the drawer ---------------------------------------------------------


def test_the_runs_list_counts_and_filters_by_status(client, world):
    html = page(client, "/")
    assert re.search(r'data-status="partial">partial <span class="count">1</span>', html)
    assert re.search(r'data-status="queued">queued <span class="count">1</span>', html)
    partial = page(client, "/?status=partial")
    assert str(world.partly_failed_run) in partial and str(world.queued_run) not in partial
    fragment = page(client, "/?status=partial&fragment=runs")
    assert "<html" not in fragment and str(world.partly_failed_run) in fragment


def test_the_drawer_shows_jobs_items_with_errors_timeline_and_lineage(client, world, conn):
    html = page(client, f"/runs/{world.partly_failed_run}")
    assert 'id="run-status">partial' in html
    assert "failed 1, sent 2" in html  # item counts
    job_id = conn.execute("SELECT id FROM job_queue WHERE run_id = %s", (world.partly_failed_run,)).fetchone()[0]
    assert str(job_id) in html
    failed = conn.execute("SELECT id, error FROM channel_outbox WHERE run_id = %s AND status = 'failed'",
                          (world.partly_failed_run,)).fetchone()
    assert str(failed[0]) in html
    timeline = html.split('id="timeline"')[1]
    assert "partial" in timeline and "completed" in timeline  # the run's and the job's last moves
    assert "(this run)" in html and 'id="retry"' in html and 'id="cancel"' not in html
    only_failed = page(client, f"/runs/{world.partly_failed_run}?items=failed")
    assert only_failed.split('id="items"')[1].split("</table>")[0].count('class="status ') == 1


def all_pages(client, token, url):
    """Follow a drawer's `Next items` links from `url`; every item id seen, in order."""
    seen: list[str] = []
    while url:
        html = page(client, url, token)
        items = html.split('id="items"')[1].split("</table>")[0]
        seen += re.findall(r'<tr><td class="mono">([0-9a-f-]{36})</td>', items)
        following = re.search(r'id="next-items" href="([^"]+)"', html)
        url = following.group(1).replace("&amp;", "&").replace("%7C", "|") if following else None
    return seen


def test_items_come_in_keyset_pages_of_all_or_of_one_status(conn, kernel_schema):
    big = seed_campaign(conn, kernel_schema, contacts=PAGE * 3 + 7, provider="noop", name="big")
    contacts = iter(range(10**6))
    run_id = drain_run(conn, Kernel(conn, kernel_schema).deploy_campaign(big.campaign_id, 40),
                       lambda item: "failed" if next(contacts) % 3 else "sent")
    token = "big-tenant-token-0123456789"
    with ConnectionPool(conn.info.dsn, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        client = create_app(Console(Settings(dsn=conn.info.dsn, schema=kernel_schema),
                                    Tokens([(token, Access(big.tenant_id))]), pool)).test_client()
        every = all_pages(client, token, f"/runs/{run_id}")
        failed = all_pages(client, token, f"/runs/{run_id}?items=failed")
    assert len(every) == PAGE * 3 + 7 == len(set(every))
    assert every == sorted(every)  # id order, as run_items pages them
    real_failed = {str(i) for (i,) in conn.execute(
        "SELECT id FROM channel_outbox WHERE run_id = %s AND status = 'failed'", (run_id,))}
    assert len(real_failed) > PAGE * 2  # several pages, from several jobs
    assert len(failed) == len(set(failed)) and set(failed) == real_failed


def test_retry_asks_first_then_makes_a_linked_run(client, world, conn):
    question = page(client, f"/runs/{world.partly_failed_run}/retry")
    assert "re-sends the 1 failed items" in question and 'id="confirm"' in question
    response = post(client, f"/runs/{world.partly_failed_run}/retry")
    assert response.status_code == 302
    new_run = uuid.UUID(response.headers["Location"].rsplit("/", 1)[1])
    assert conn.execute("SELECT retry_of_run_id, generation FROM campaign_runs WHERE id = %s",
                        (new_run,)).fetchone() == (world.partly_failed_run, 2)
    lineage = page(client, f"/runs/{new_run}").split('id="lineage"')[1].split("</table>")[0]
    assert f'href="/runs/{world.partly_failed_run}"' in lineage and f"{new_run} (this run)" in lineage
    again = post(client, f"/runs/{world.queued_run}/retry")  # not finished: the kernel refuses
    assert again.status_code == 409 and "KE011" in again.text


def test_cancel_asks_first_then_cancels(client, world, conn):
    assert "Its scheduled and queued jobs stop" in page(client, f"/runs/{world.queued_run}/cancel")
    response = post(client, f"/runs/{world.queued_run}/cancel")
    assert response.status_code == 302 and response.headers["Location"] == f"/runs/{world.queued_run}"
    status = conn.execute("SELECT status FROM campaign_runs WHERE id = %s", (world.queued_run,)).fetchone()[0]
    assert status == "cancelled"
    summary = page(client, f"/runs/{world.queued_run}?fragment=summary")
    assert "data-final" in summary and 'id="cancel"' not in summary


# --- the launch checklist and deploy ------------------------------------------------------


def test_checklist_and_deploy(client, world, conn):
    campaign = world.ready_campaign.campaign_id
    html = page(client, f"/campaigns/{campaign}")
    assert 'id="ready"' in html and 'id="deploy"' in html and html.count('class="status pass"') == 8
    response = post(client, f"/campaigns/{campaign}/deploy", {"priority": "7"})
    assert response.status_code == 302
    run_id = uuid.UUID(response.headers["Location"].rsplit("/", 1)[1])
    assert conn.execute("SELECT campaign_id, priority, status FROM campaign_runs WHERE id = %s",
                        (run_id,)).fetchone() == (campaign, 7, "queued")
    again = post(client, f"/campaigns/{campaign}/deploy")
    assert again.status_code == 409 and "Refused by the kernel" in again.text and "KE003" in again.text


def test_an_unready_campaign_shows_what_to_do_and_cannot_be_deployed(client, world, conn):
    html = page(client, f"/campaigns/{world.unready_campaign.campaign_id}")
    assert 'id="not-ready"' in html and 'id="deploy"' not in html
    assert "add contacts to kernel.campaign_audience" in html
    refused = post(client, f"/campaigns/{world.unready_campaign.campaign_id}/deploy")
    assert refused.status_code == 409 and "KE001" in refused.text
    assert conn.execute("SELECT count(*) FROM campaign_runs WHERE campaign_id = %s",
                        (world.unready_campaign.campaign_id,)).fetchone()[0] == 0


def test_a_scheduled_deploy_needs_a_time_with_its_offset(client, world, conn):
    campaign = world.ready_campaign.campaign_id
    for form, says in (({"start_at": "2030-01-01T09:00"}, "has no UTC offset"),
                       ({"start_at": "tomorrow"}, "is not an ISO 8601 time"),
                       ({"priority": "high"}, "priority must be a whole number"),
                       ({"priority": "5000"}, "KE008")):
        refused = post(client, f"/campaigns/{campaign}/deploy", form)
        assert refused.status_code == 400 and says in refused.text, (form, refused.text)
    assert conn.execute("SELECT count(*) FROM campaign_runs WHERE campaign_id = %s", (campaign,)).fetchone()[0] == 0
    done = post(client, f"/campaigns/{campaign}/deploy", {"start_at": "2030-01-01T09:00+01:00"})
    shown = page(client, done.headers["Location"])
    assert "start 2030-01-01 08:00:00+00:00" in shown


# --- bad requests -------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "status", "says"), [
    ("/runs/not-a-uuid", 404, "Not Found"),
    (f"/runs/{uuid.UUID(int=7)}", 404, "not found"),
    ("/?status=exploded", 400, "status must be one of"),
    ("/?campaign=12", 400, "is not a uuid"),
    ("/?before=garbage", 400, "cursor is malformed"),
    ("/runs/00000000-0000-0000-0000-000000000007?items=lost", 400, "items must be one of"),
    ("/nowhere", 404, "Not Found"),
])
def test_bad_requests_get_an_error_page(client, world, url, status, says):
    html = page(client, url, status=status)
    assert says in html and 'id="error-detail"' in html
    no_traceback(html)


def test_oversized_and_json_error_requests(client):
    huge = client.post("/login", data={"token": "x" * (MAX_REQUEST_BYTES + 1)})
    assert huge.status_code == 413
    no_traceback(huge.text)
    as_json = client.get("/?status=exploded", headers={**bearer(TENANT_A_TOKEN), "Accept": "application/json"})
    assert as_json.status_code == 400 and as_json.json["error"] == "Bad Request"


def test_an_unreachable_database_is_a_503_page():
    unreachable = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    with ConnectionPool(unreachable, min_size=0, max_size=1, timeout=1, open=True,
                        kwargs={"autocommit": True}) as pool:
        tokens = Tokens([(ADMIN_TOKEN, Access(None))])
        client = create_app(Console(Settings(dsn=unreachable), tokens, pool)).test_client()
        html = page(client, "/", ADMIN_TOKEN, status=503)
    assert "cannot reach its database" in html
    no_traceback(html)


def test_a_login_without_the_kernel_roles_is_told_what_to_grant(db_dsn, kernel_schema, world, conn):
    role = f"{kernel_schema}_console_test"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        dsn = psycopg.conninfo.make_conninfo(db_dsn, user=role)
        with ConnectionPool(dsn, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
            client = create_app(Console(Settings(dsn=dsn, schema=kernel_schema),
                                        Tokens([(ADMIN_TOKEN, Access(None))]), pool)).test_client()
            html = page(client, "/", ADMIN_TOKEN, status=503)
        assert f"GRANT {kernel_schema}_reader, {kernel_schema}_app, {kernel_schema}_operator TO" in html
    finally:
        conn.execute(f"DROP ROLE {role}")
