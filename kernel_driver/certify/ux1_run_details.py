"""UX1: a run, its jobs and its outbox items visible through run_details and `runs show`."""

from __future__ import annotations

import json
import uuid

from kernel_driver.certify.harness import Certification
from kernel_driver.certify.records import CheckRecord, expect
from kernel_driver.testing.sinks import SmtpSink

UX1_CONTACTS = 6  # every third unsubscribed: 4 sent, 2 skipped
UX1_BATCH = 3


def check_run_details(cert: Certification, record: CheckRecord) -> None:
    """A finished run as run_details and `kernel-driver runs show` present it."""
    with SmtpSink() as sink:
        campaign = cert.campaign(record, "email", "smtp", sink.provider_settings(), UX1_CONTACTS, unsubscribed_every=3)
        run_id = cert.deploy(record, campaign, batch_size=UX1_BATCH)
        cert.run_daemon_until_idle(record, "ux1")
        cert.wait_for_runs([run_id])

    details = cert.kernel.run_details(uuid.UUID(run_id), 100)
    job_ids = [job["id"] for job in details["jobs"]]
    counts = details["item_counts"]
    record.measurements = {"jobs": len(job_ids), "items": len(details["items"]), "item_counts": counts}
    expect(details["run"]["id"] == run_id, f"run_details({run_id}) describes run {details['run']['id']}")
    expect(len(job_ids) == UX1_CONTACTS // UX1_BATCH, f"run_details lists {len(job_ids)} jobs")
    expect(counts == {"sent": 4, "skipped": 2}, f"run_details counts items {counts}, expected 4 sent, 2 skipped")
    expect(
        {item["job_id"] for item in details["items"]} == set(job_ids) and len(details["items"]) == UX1_CONTACTS,
        "run_details items do not belong to its jobs",
    )

    shown = cert.run_cli("runs", "show", run_id, "--items", str(UX1_CONTACTS))
    wanted = [run_id, *job_ids, *(f"{status} {n}" for status, n in counts.items())]
    wanted += [item["provider_message_id"] for item in details["items"] if item["provider_message_id"]]
    missing = [text for text in wanted if text not in shown]
    record.measurements["runs_show_lines"] = len(shown.splitlines())
    expect(not missing, f"`kernel-driver runs show {run_id}` does not show {missing}")
    as_json = json.loads(cert.run_cli("runs", "show", run_id, "--json"))
    expect(
        as_json["run"]["id"] == run_id and as_json["item_counts"] == counts,
        "`runs show --json` disagrees with run_details",
    )
