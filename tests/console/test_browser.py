"""The console end to end: `kernel-driver ui` in a process of its own, driven in a real headless
Chromium (Debian's, through Playwright). The screenshots in docs/img come from here:
KERNEL_TEST_SCREENSHOTS=docs/img (make screenshots) writes them there, else into a temp dir."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_driver.queries import Kernel
from tests.console.conftest import ADMIN_TOKEN, TENANT_A_TOKEN, TENANT_B_TOKEN, World
from tests.sql.helpers import claim, drain_run, reserve

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("KERNEL_TEST_CHROMIUM", "/usr/bin/chromium")
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not shutil.which(CHROMIUM):
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with playwright_api.sync_playwright() as playwright:
        # As root Chromium refuses to start with its sandbox on.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(db_dsn: str, kernel_schema: str, world: World, tmp_path: Path) -> Iterator[str]:
    """The console over the world's database, started as an operator would; its address."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin {ADMIN_TOKEN}\ntenant {world.tenant_a} {TENANT_A_TOKEN}\n"
                      f"tenant {world.tenant_b} {TENANT_B_TOKEN}\n")
    port = free_port()
    log = (tmp_path / "console.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "kernel_driver", "--dsn", db_dsn, "--schema", kernel_schema, "ui",
         "--bind", f"127.0.0.1:{port}", "--tokens", str(tokens), "--threads", "4"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None, (tmp_path / "console.log").read_text()
            assert time.monotonic() < deadline, "the console did not start listening within 30 s"
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)
    log.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("KERNEL_TEST_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target


def signed_in(browser, base: str, token: str):
    page = browser.new_page(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{base}/login?token={token}")
    return page


def screenshot(page, shots: Path, name: str) -> None:
    path = shots / f"console-{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one


def test_runs_drawer_retry_and_cancel(browser, served, world, shots, conn, kernel_schema):
    # A daemon holds the queued run's job (claimed, one item reserved): the run is running.
    # Claimed now, before Retry adds a queued run of its own; tenant B's run is cancelled
    # first, so the claim can only take that job.
    Kernel(conn, kernel_schema).cancel_campaign_run(world.other_run)
    (job,) = claim(conn, "w1", 1)
    assert job["run_id"] == world.queued_run
    reserve(conn, job["id"], "w1", 1)
    page = signed_in(browser, served, TENANT_A_TOKEN)
    expect = playwright_api.expect
    runs = page.locator("#runs")
    expect(runs.locator(f'tr[data-run="{world.partly_failed_run}"] .status')).to_have_text("partial")
    page.click(f'tr[data-run="{world.partly_failed_run}"] a')

    drawer = page.locator("#run-drawer")
    expect(drawer.locator("#run-status")).to_contain_text("partial")
    expect(drawer.locator("#item-counts")).to_have_text("failed 1, sent 2")
    expect(drawer.locator("#jobs tbody tr")).to_have_count(1)
    expect(drawer.locator("#items tbody tr")).to_have_count(3)
    expect(drawer.locator("#items tbody tr", has_text="failed")).to_have_count(1)
    expect(drawer.locator("#timeline tbody tr").first).to_contain_text("partial")
    screenshot(page, shots, "drawer")

    page.click("#retry")
    expect(page.locator("h1")).to_contain_text("Retry run")
    page.click("#confirm")
    expect(page.locator("#run-drawer #lineage")).to_contain_text("(this run)")
    lineage = page.locator("#lineage tbody tr")
    expect(lineage).to_have_count(2)
    expect(lineage.first.locator("a")).to_have_text(str(world.partly_failed_run))
    retry_run = page.url.rsplit("/", 1)[1]
    assert retry_run != str(world.partly_failed_run)

    page.goto(f"{served}/runs/{world.queued_run}")
    expect(page.locator("#run-status")).to_have_text("running")
    expect(page.locator("#jobs tbody tr").first).to_contain_text("w1")  # the lock holder
    page.click("#cancel")
    page.click("#confirm")
    expect(page.locator("#run-status")).to_contain_text("cancelled")
    expect(page.locator("#item-counts")).to_contain_text("skipped")  # its reserved item never went out
    page.goto(served)
    expect(page.locator(f'tr[data-run="{retry_run}"] .status')).to_have_text("queued")
    expect(page.locator('a[data-status="cancelled"] .count')).to_have_text("1")


def test_checklist_deploy_and_live_progress(browser, served, world, shots, conn, kernel_schema):
    page = signed_in(browser, served, TENANT_A_TOKEN)
    expect = playwright_api.expect
    page.click("text=Campaigns")
    page.click(f'tr[data-campaign="{world.unready_campaign.campaign_id}"] >> text=Launch checklist')
    expect(page.locator("#not-ready")).to_be_visible()
    expect(page.locator('tr[data-check="audience_not_empty"]')).to_contain_text("add contacts")
    expect(page.locator("#deploy")).to_have_count(0)

    page.goto(f"{served}/campaigns")
    page.click(f'tr[data-campaign="{world.ready_campaign.campaign_id}"] >> text=Launch checklist')
    expect(page.locator("#ready")).to_be_visible()
    expect(page.locator("#checks .status.pass")).to_have_count(8)
    screenshot(page, shots, "checklist")
    page.fill('input[name="priority"]', "5")
    page.click("#deploy")
    expect(page.locator("#run-status")).to_have_text("queued")
    run_id = page.url.rsplit("/", 1)[1]

    # Work done meanwhile shows up in the open drawer without a reload (live.js). The world's
    # other queued runs are cancelled first: drain_run wants the run's jobs to be the only ones.
    kernel = Kernel(conn, kernel_schema)
    kernel.cancel_campaign_run(world.queued_run)
    kernel.cancel_campaign_run(world.other_run)
    drain_run(conn, uuid.UUID(run_id), "sent")
    expect(page.locator("#run-status")).to_have_text("completed")
    expect(page.locator("#item-counts")).to_have_text("sent 2")


def test_certification_runs_and_its_evidence_downloads(browser, served, shots, tmp_path):
    page = signed_in(browser, served, ADMIN_TOKEN)
    expect = playwright_api.expect
    page.click("text=Certification")
    page.click("#run-certification")
    result = page.locator("#certification-result")
    expect(result).to_have_text("running")
    expect(result).to_have_text("passed", timeout=180_000)
    expect(page.locator("#certification-log")).to_contain_text("PASS: 7 of 7 checks passed")
    screenshot(page, shots, "certification")
    with page.expect_download() as download:
        page.click("#download-evidence")
    saved = tmp_path / "evidence.json"
    download.value.save_as(saved)
    evidence = json.loads(saved.read_text())
    assert evidence["summary"]["result"] == "PASS"
    assert [check["status"] for check in evidence["checks"]] == ["PASS"] * 7


def test_a_second_tenant_sees_nothing_of_the_first(browser, served, world):
    page = signed_in(browser, served, TENANT_B_TOKEN)
    expect = playwright_api.expect
    expect(page.locator(f'tr[data-run="{world.other_run}"]')).to_have_count(1)
    expect(page.locator("#runs tbody tr")).to_have_count(1)
    for url in (f"/runs/{world.partly_failed_run}", f"/runs/{world.queued_run}/cancel",
                f"/campaigns/{world.ready_campaign.campaign_id}"):
        response = page.goto(served + url)
        assert response is not None and response.status == 404
        expect(page.locator("#error-detail")).to_contain_text("not found")
    expect(page.locator("header")).not_to_contain_text("Certification")
    assert page.goto(served + "/certification").status == 403
